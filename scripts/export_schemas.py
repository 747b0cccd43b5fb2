"""Write the JSON Schemas of loraformats' public results into `specs/`.

    python scripts/export_schemas.py           # (re)write specs/*.schema.json
    python scripts/export_schemas.py --check   # exit 1 if a file is missing or stale (the tests run this)

The schemas come from the pydantic models (`Detection`, `Inspection`); apps validate
`detect --json` / `inspect --json` output against them. The files ship inside the package too
(`importlib.resources.files("loraformats.specs")`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from loraformats.detection import Detection
from loraformats.inspection import Inspection

SPECS = Path(__file__).resolve().parents[1] / "specs"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS: dict[str, type[BaseModel]] = {
    "detection.schema.json": Detection,
    "inspection.schema.json": Inspection,
}


def schema_text(model: type[BaseModel]) -> str:
    schema = {"$schema": DIALECT, **model.model_json_schema()}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, model in SCHEMAS.items():
        path, text = SPECS / name, schema_text(model)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(SPECS.parent)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/export_schemas.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
