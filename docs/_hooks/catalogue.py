"""MkDocs hook: pages generated from the installed plugins, so the docs cannot drift from the code.

`reference/catalogue.md` lists every format (schemas and capabilities), family (components, module
counts, namings) and transform, and draws the conversion graph.
"""

from __future__ import annotations

from mkdocs.structure.files import File


def _schema_rows(schema) -> list[str]:
    from loraformats.schemas import schema_fields

    if schema is None:
        return ["none"]
    rows = []
    for name, field in schema_fields(schema).items():
        default = f" (default `{field['default']!r}`)" if "default" in field else ""
        rows.append(f"`{name}`{default}: {field.get('description', '')}".rstrip(": "))
    return rows or ["none"]


def catalogue() -> str:
    from loraformats.plugins import registry

    formats, families, transforms = registry.formats(), registry.families(), registry.transforms()
    lines = [
        "# Formats, families and transforms",
        "",
        "Generated at build time from the installed plugins (`docs/_hooks/catalogue.py`).",
        "",
    ]
    lines += ["## Conversion graph", "", "```mermaid", "graph LR"]
    lines.append('  C(("canonical form"))')
    for name, fmt in formats.items():
        lines.append(f'  {name.replace("-", "_")}["{name}"] -- read --> C')
        if fmt.writable:
            lines.append(f'  C -- write --> {name.replace("-", "_")}_out["{name}"]')
    for name, transform in transforms.items():
        lines.append(f'  C -- "{name} ({transform.exactness.value})" --> C')
    lines += ["```", "", "## Formats", ""]
    for name, fmt in formats.items():
        lines += [
            f"### {name}",
            "",
            f"{fmt.label}. {fmt.description}",
            "",
            f"- container: {fmt.container}; {'read/write' if fmt.writable else 'read-only'}",
            f"- plugin: `{fmt.plugin}`",
            f"- holds: {', '.join(f'`{c}`' for c in sorted(fmt.capabilities)) or 'nothing'}",
            f"- owns metadata: {', '.join(f'`{k}`' for k in fmt.owned_metadata) or 'none'}",
            "",
            "Options (`--set KEY=VALUE`):",
            "",
        ]
        lines += [f"- {row}" for row in _schema_rows(fmt.options_schema)]
        lines += ["", "Metadata / config schema:", ""]
        lines += [f"- {row}" for row in _schema_rows(fmt.metadata_schema)]
        lines.append("")
    lines += ["## Families", ""]
    for name, family in families.items():
        lines += [
            f"### {name}",
            "",
            f"{family.label} (plugin `{family.plugin}`).",
            "",
            "| component | role | slot | modules | linear | conv2d | norm | namings |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for component in family.components.values():
            kinds = [layer.kind for layer in component.modules.values()]
            namings = ", ".join(component.naming_names())
            lines.append(
                f"| `{component.name}` | {component.role} | {component.slot or ''} | {len(kinds)} | "
                f"{kinds.count('linear')} | {kinds.count('conv2d')} | {kinds.count('norm')} | {namings} |"
            )
        lines.append("")
    lines += ["## Transforms", "", "| transform | removes | exactness | what it does |", "|---|---|---|---|"]
    for name, transform in transforms.items():
        lines.append(
            f"| `{name}` | `{transform.removes}` | {transform.exactness.value} | {transform.description} |"
        )
    return "\n".join(lines) + "\n"


def on_files(files, config):
    files.append(File.generated(config, "reference/catalogue.md", content=catalogue()))
    return files
