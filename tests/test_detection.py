"""Detection names format and family from the header alone, says which shapes decided, reports metadata
that contradicts the tensors, and says `ambiguous` when it cannot tell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

import loraformats
import unreadable
from headers.corpus import (
    OTHER,
    SPELLINGS,
    Layout,
    build,
    corpus,
    header_bytes,
    modules,
    rank_of,
    write,
    write_files,
)
from loraformats import format_choice
from loraformats.adapters import ALGORITHMS
from loraformats.assemble import Resolution, resolve_all
from loraformats.cli import main
from loraformats.detection import header_from_bytes
from loraformats.errors import UsageError
from loraformats.formats import SAMPLE_NAMES
from loraformats.plugins import registry

ROOT = Path(__file__).resolve().parents[1]


def kohya_from_table(path, family: str, keep, *, naming: str | None = None) -> int:
    """A rank-1 Kohya file over the production table's modules for which keep(component, path) holds."""
    table = registry.families()[family]
    tensors = {}
    for component, module, layer in table.iter_modules():
        if layer.kind not in ("linear", "conv2d") or not keep(component.name, module):
            continue
        prefix = (
            "lora_unet"
            if component.role == "denoiser"
            else ("lora_te" if len(table.text_encoders()) == 1 else f"lora_te{component.slot}")
        )
        chosen = naming if naming and component.role == "denoiser" else component.flat_naming
        name = component.name_in(module, chosen).replace(".", "_")
        tail = tuple(layer.kernel) if layer.kind == "conv2d" else ()
        tensors[f"{prefix}_{name}.lora_down.weight"] = torch.ones(
            (1, layer.in_features, *tail), dtype=torch.float16
        )
        tensors[f"{prefix}_{name}.lora_up.weight"] = torch.ones(
            (layer.out_features, 1, *((1, 1) if tail else ())), dtype=torch.float16
        )
    save_file(tensors, path)
    return len(tensors) // 2


def unreadable_data():
    """Any attempt to read tensor data fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("detection read tensor data")

    return mock.patch.object(os, "pread", refuse)


CASES = {
    "sd1 unet + te": ("sd1", lambda c, p: ".attentions." in p or c == "text_encoder", "sd1"),
    "sd1 unet only": ("sd1", lambda c, p: c == "unet" and ".attentions." in p, "sd1"),
    "sd2 unet only": ("sd2", lambda c, p: c == "unet" and ".attentions." in p, "sd2"),
    "sd2 te only": ("sd2", lambda c, p: c == "text_encoder", "sd2"),
    "sdxl unet only": ("sdxl", lambda c, p: c == "unet" and ".attentions." in p, "sdxl"),
    # SD3's second encoder is SDXL's OpenCLIP-G: the header cannot tell them apart
    "sdxl te2 only": ("sdxl", lambda c, p: c == "text_encoder_2", "ambiguous"),
    "sd1 attn1 only": ("sd1", lambda c, p: c == "unet" and ".attn1." in p, "ambiguous"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_family_from_header_alone(case, tmp_path):
    family, keep, expected = CASES[case]
    path = tmp_path / "lora.safetensors"
    kohya_from_table(path, family, keep)
    with unreadable_data():
        result = loraformats.detect(path)
    assert (result.format, result.family) == ("kohya", expected), result.reasons
    assert result.reasons


def test_ambiguous_answer_lists_candidates_and_convert_names_them(tmp_path, capsys):
    """Detection says `ambiguous`; conversion proceeds because both families name and shape every
    module the same way (the output cannot depend on the choice), and says so."""
    path = tmp_path / "attn1.safetensors"
    kohya_from_table(path, "sd1", lambda c, p: c == "unet" and ".attn1." in p)
    result = loraformats.detect(path)
    assert result.family == "ambiguous"
    fitting = {c.name for c in result.families if c.score == 1.0 and not c.against}
    assert {"sd1", "sd2"} <= fitting
    assert main(["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert "sd1, sd2" in capsys.readouterr().err
    chosen = [
        "convert",
        str(path),
        "--to",
        "diffusers",
        "-o",
        str(tmp_path / "b.safetensors"),
        "--family",
        "sd2",
    ]
    assert main(chosen) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_sdxl_in_both_namings_and_diffusers_output(tmp_path):
    for naming in ("ldm", "canonical"):
        path = tmp_path / f"{naming}.safetensors"
        kohya_from_table(path, "sdxl", lambda c, p: ".attentions." in p or c != "unet", naming=naming)
        with unreadable_data():
            assert loraformats.detect(path).family == "sdxl"
        converted = tmp_path / f"{naming}.diffusers.safetensors"
        loraformats.convert(path, "diffusers", converted)
        with unreadable_data():
            result = loraformats.detect(converted)
        assert (result.format, result.family) == ("diffusers", "sdxl")
        assert {c.name for c in result.components} == {"unet", "text_encoder", "text_encoder_2"}


def test_not_a_lora_is_unknown(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, path)
    result = loraformats.detect(path)
    assert (result.format, result.family) == ("unknown", "unknown")


# ------------------------------------------------------------------------------------------ the corpus

LAYOUTS = corpus()
#: (family, selection) -> the families that fit equally; reviewed by hand: SD1 and SD2 share every
#: self-attention and ResNet shape, and SD1's text encoder is SDXL's first (CLIP ViT-L) exactly.
TIES = {
    ("sd1", "attn1"): {"sd1", "sd2"},
    ("sd2", "attn1"): {"sd1", "sd2"},
    ("sd1", "conv"): {"sd1", "sd2"},
    ("sd2", "conv"): {"sd1", "sd2"},
    # CLIP ViT-L/14 is also FLUX.1's and SD3's first text encoder
    ("sd1", "te"): {"sd1", "sdxl", "flux1", "sd3", "sd3.5-medium", "sd3.5-large"},
    # SD3 has SDXL's two CLIP encoders (its projections, which would tell them apart, are not adapted)
    ("sdxl", "te"): {"sdxl", "sd3", "sd3.5-medium", "sd3.5-large"},
    ("sdxl", "te2"): {"sdxl", "sd3", "sd3.5-medium", "sd3.5-large"},
}


def fitting(result) -> set[str]:
    """Families that explain every module (metadata may still speak against one of them)."""
    return {c.name for c in result.families if c.score == 1.0}


def expected_variant(layout: Layout) -> str:
    family = registry.families()[layout.family]
    naming = layout.spelling or family.components["unet"].flat_naming
    has_unet = any(c.role == "denoiser" for c, _, _ in modules(layout))
    return "unet: ldm" if layout.format == "kohya" and naming == "ldm" and has_unet else "canonical"


def test_corpus_covers_every_format_spelling_and_family():
    seen = {(layout.family, layout.format, layout.spelling) for layout in LAYOUTS}
    for family in ("sd1", "sd2", "sdxl"):
        for fmt, spellings in SPELLINGS.items():
            assert {(family, fmt, s) for s in spellings} <= seen
    assert len(LAYOUTS) >= 300
    assert {"tucker", "dora"} <= {layout.algorithm for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.id for layout in LAYOUTS])
def test_corpus_layout_is_identified_from_its_header(layout):
    fixture = build(layout)
    result = loraformats.detect(header_bytes(fixture))
    tie = TIES.get((layout.family, layout.selection))
    assert result.format == layout.format, result.reasons
    assert result.family == ("ambiguous" if tie else layout.family), result.reasons
    if tie:
        assert fitting(result) == tie
        assert any("modules that would tell them apart are absent" in r for r in result.reasons)
    assert result.variant == expected_variant(layout)
    assert result.algorithms == ["dora" if layout.algorithm == "dora" else "lora"]
    per_component = Counter(c.name for c, _, _ in modules(layout))
    assert {c.name: c.modules for c in result.components} == dict(per_component)
    ranks = Counter(str(rank_of(layout, i, layer)) for i, (_, _, layer) in enumerate(modules(layout)))
    assert sum((Counter(c.ranks) for c in result.components), Counter()) == ranks
    assert {d for c in result.components for d in c.dtypes} == {layout.dtype}
    assert sum(g.modules for g in result.groups) == sum(per_component.values())
    claimed = OTHER[layout.family] if layout.metadata == "contradicting" else layout.family
    assert bool(result.contradictions) == (claimed not in (tie or {layout.family}))  # a tie may agree
    certainty = 1 / len(tie) if tie else 1.0
    assert result.confidence == pytest.approx(certainty * (0.9 if result.contradictions else 1.0), abs=1e-4)


def assert_sampling_changes_nothing(raw: bytes) -> None:
    """Formats and families are first judged on a sample of a large file; the complete formats and
    the fitting families must be exactly those a reading of every name finds."""
    header = header_from_bytes(raw)
    sampled = format_choice.sniff_all(header)
    every = format_choice.sniff_all(header, exhaustive=True)
    complete = [f.name for f in format_choice.complete(header, sampled)[0]]
    assert complete == [f.name for f in format_choice.complete(header, every)[0]]
    assert {n for n, e in sampled.items() if e.score >= 1} == {n for n, e in every.items() if e.score >= 1}
    if not complete:
        return
    parsed = registry.formats()[complete[0]].parse(header)
    families = list(registry.families().values())
    quick = resolve_all(parsed, header, families)
    full = resolve_all(parsed, header, families, exhaustive=True)
    assert [r.fits for r in quick] == [r.fits for r in full]
    assert all(q.matches == f.matches for q, f in zip(quick, full, strict=True) if f.fits)
    for family, resolution in zip(families, full, strict=True):
        assert placed(resolution) == placed_one_by_one(parsed, header, family)


def placed(resolution: Resolution) -> tuple:
    """What a resolution says of each module, and its census."""
    matches = [(m.module.key, m.component.name, m.path, m.naming) for m in resolution.matches]
    return matches, resolution.matched, resolution.unknown, resolution.misfit, dict(resolution.census)


def placed_one_by_one(parsed, header, family) -> tuple:
    """The reference the resolver's runs must agree with: each module in turn, the first component
    its hint allows and the first of its names found there with shapes that fit."""
    matches, unknown, misfit, census = [], [], [], Counter()
    for module in parsed.modules:
        shapes = {role: header.tensors[name].shape for role, name in module.tensors.items()}
        geometry = [module.algorithm]
        for role, name in module.tensors.items():
            geometry += (role, header.tensors[name].dtype, header.tensors[name].shape)
        problem = None
        for component in family.find_components(module.hint):
            lookup = component.resolve_flat if module.flat else component.resolve_dotted
            hits = [hit for hit in map(lookup, module.names) if hit is not None]
            for hit in hits:
                problem = ALGORITHMS[module.algorithm].shape_problem(shapes, component.modules[hit[0]])
                if problem is None:
                    matches.append((module.key, component.name, *hit))
                    census[component.places[hit], tuple(geometry)] += 1
                    break
            else:
                continue
            break
        else:
            if problem:
                misfit.append(f"{module.key} ({problem})")
            else:
                unknown.append(module.key)
    return matches, len(matches), unknown, misfit, dict(census)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.id for layout in LAYOUTS])
def test_sampling_a_large_header_never_changes_the_verdict(layout):
    assert_sampling_changes_nothing(header_bytes(build(layout)))


@pytest.mark.parametrize(
    "fixture", sorted((Path(__file__).parent / "headers" / "tools").glob("*.json")), ids=lambda p: p.stem
)
def test_sampling_never_changes_the_verdict_on_files_real_tools_wrote(fixture):
    for recorded in json.loads(fixture.read_text())["files"].values():
        if isinstance(recorded, dict) and "tensors" in recorded:  # not a PEFT directory's config
            assert_sampling_changes_nothing(header_bytes(recorded))


def test_a_rare_name_a_sample_misses_still_decides_the_format():
    """One LoHa module among a thousand LoRA modules, away from the sampled names, makes the file
    LyCORIS's, not Kohya's."""
    fixture = build(Layout("sdxl", "kohya"))
    names = list(fixture["tensors"])
    step = len(names) // SAMPLE_NAMES
    at = next(  # a linear module whose down, up and alpha all sit between two sampled names
        i
        for i, name in enumerate(names)
        if name.endswith(".lora_down.weight")
        and len(fixture["tensors"][name][1]) == 2
        and i % step > 0
        and i % step + 3 < step
    )
    stem = names[at].removesuffix(".lora_down.weight")
    dtype, (rank, fan_in) = fixture["tensors"][names[at]]
    fan_out = fixture["tensors"][f"{stem}.lora_up.weight"][1][0]
    loha = {"w1_a": [fan_out, rank], "w1_b": [rank, fan_in], "w2_a": [fan_out, rank], "w2_b": [rank, fan_in]}
    tensors = {}
    for name, entry in fixture["tensors"].items():
        if name == names[at]:
            tensors.update({f"{stem}.hada_{factor}": [dtype, shape] for factor, shape in loha.items()})
        elif name != f"{stem}.lora_up.weight":
            tensors[name] = entry
    fixture["tensors"] = tensors
    assert not any(".hada_" in name for name in list(tensors)[:: len(tensors) // SAMPLE_NAMES])
    result = loraformats.detect(header_bytes(fixture))
    assert result.format == "lycoris", result.reasons
    assert result.algorithms == ["loha", "lora"]


# ------------------------------------------------------------------------------------------ real tools

TOOLS = sorted((Path(__file__).parent / "headers" / "tools").glob("*.json"))


@pytest.mark.parametrize("fixture", TOOLS, ids=[path.stem for path in TOOLS])
def test_headers_written_by_real_tools_are_identified(fixture, tmp_path):
    recorded = json.loads(fixture.read_text())
    root = write_files(recorded["files"], tmp_path)
    target = root if len(recorded["files"]) > 1 else root / next(iter(recorded["files"]))
    with unreadable_data():
        result = loraformats.detect(target)
    expect = recorded["expect"]
    assert (result.format, result.family) == (expect["format"], expect["family"]), result.reasons
    if "unsupported" in expect:
        assert any(expect["unsupported"] in reason for reason in result.reasons)
        return
    assert result.algorithms == expect["algorithms"]
    assert [c.name for c in result.components] == expect["components"]
    assert result.confidence == 1.0


# ------------------------------------------------------------------------------------------ evidence


def test_reasons_name_the_shapes_that_decided():
    result = loraformats.detect(header_bytes(build(Layout("sd1", "kohya", selection="unet_attention"))))
    assert result.family == "sd1"
    decided = [r for r in result.reasons if r.startswith("not sd2:")]
    assert decided and "attn2_to_k: input width 768 (sd1) vs 1024 (sd2)" in decided[0]
    sd2 = next(c for c in result.families if c.name == "sd2")
    assert any("input width 768 (sd1) vs 1024 (sd2)" in text for text in sd2.against)


def test_names_alone_can_decide_and_say_so():
    result = loraformats.detect(header_bytes(build(Layout("sdxl", "diffusers"))))
    assert result.family == "sdxl"
    assert any(r.startswith("not sd3:") and "module names it does not have" in r for r in result.reasons)


def test_metadata_that_names_another_family_is_a_contradiction_and_the_tensors_win():
    layout = Layout("sdxl", "kohya", selection="attention", metadata="contradicting")
    result = loraformats.detect(header_bytes(build(layout)))
    assert result.family == "sdxl"
    assert len(result.contradictions) == 2
    assert result.contradictions[0].startswith(
        "ss_base_model_version=sd_v1 names sd1, but the tensors fit sdxl"
    )
    assert "input width 2048 (sdxl) vs 768 (sd1)" in result.contradictions[0]
    assert result.contradictions[1].startswith("modelspec.architecture=stable-diffusion-v1/lora names sd1")
    sd1 = next(c for c in result.families if c.name == "sd1")
    assert "metadata ss_base_model_version=sd_v1 names sd1" in sd1.against


def test_metadata_agreeing_with_the_tensors_is_evidence_for_the_family():
    result = loraformats.detect(header_bytes(build(Layout("sd2", "kohya", metadata="sd-scripts"))))
    assert (result.family, result.contradictions, result.confidence) == ("sd2", [], 1.0)
    sd2 = next(c for c in result.families if c.name == "sd2")
    assert "metadata modelspec.architecture=stable-diffusion-v2-512/lora names sd2" in sd2.reasons


def test_a_tie_stays_ambiguous_when_metadata_suggests_one_side():
    result = loraformats.detect(
        header_bytes(build(Layout("sd1", "kohya", selection="attn1", metadata="sd-scripts")))
    )
    assert result.family == "ambiguous" and fitting(result) == {"sd1", "sd2"}
    assert any("suggests sd1; the tensors cannot tell" in reason for reason in result.reasons)
    sd2 = next(c for c in result.families if c.name == "sd2")
    assert "metadata ss_base_model_version=sd_v1 names sd1" in sd2.against


def test_metadata_is_summarised_by_the_format_plugins():
    result = loraformats.detect(header_bytes(build(Layout("sdxl", "kohya", metadata="sd-scripts"))))
    assert result.metadata["trigger_words"] == "mychar, 1girl, solo, smile, outdoors"
    assert result.metadata["ss_network_module"] == "networks.lora"
    assert result.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "ss_session_id" not in result.metadata
    config = loraformats.detect(header_bytes(build(Layout("sd1", "diffusers", metadata="diffusers-config"))))
    assert config.metadata["lora_adapter_metadata.unet.r"] == "4"


def test_modelspec_trigger_phrase_wins_over_tag_frequency():
    fixture = build(Layout("sd1", "kohya", metadata="sd-scripts"))
    fixture["metadata"]["modelspec.trigger_phrase"] = "sks dog"
    assert loraformats.detect(header_bytes(fixture)).metadata["trigger_words"] == "sks dog"


def test_groups_follow_model_order_with_ranks_per_block():
    layout = Layout("sdxl", "kohya", ranks="mixed")
    result = loraformats.detect(header_bytes(build(layout)))
    unet = [g.block for g in result.groups if g.component == "unet"]
    assert unet.index("down_blocks.1") < unet.index("down_blocks.2") < unet.index("up_blocks.0")
    first = next(g for g in result.groups if g.block == "down_blocks.1")
    assert set(first.ranks) == {"2", "4", "8", "16"} and first.kinds["conv2d"] > 0


def test_a_file_families_read_alike_converts_as_the_family_its_metadata_names(tmp_path):
    """SDXL's second text encoder is SD3's too: a LoRA of it alone reads the same in each, so
    conversion picks the family the metadata names, else the first installed, and says which."""
    claimed = write(
        build(Layout("sdxl", "kohya", selection="te2", metadata="sd-scripts")), tmp_path / "a.safetensors"
    )
    report = loraformats.convert(claimed, "diffusers", tmp_path / "a.diffusers.safetensors")
    assert report.family == "sdxl"
    assert any(w.endswith("read as sdxl (as its metadata says)") for w in report.warnings), report.warnings
    bare = write(build(Layout("sdxl", "kohya", selection="te2", metadata="none")), tmp_path / "b.safetensors")
    report = loraformats.convert(bare, "diffusers", tmp_path / "b.diffusers.safetensors")
    assert any(w.endswith(f"read as {report.family} (the first installed)") for w in report.warnings)


def test_the_dtype_of_a_module_is_its_factors_not_its_alpha():
    """A LoHa file whose float32 alphas sort before its float16 factors reports float16."""
    family = registry.families()["sdxl"]
    tensors = {}
    for component, path, layer in family.iter_modules():
        if component.name == "unet" and layer.kind == "linear" and ".attn2.to_k" in path:
            stem = "lora_unet_" + component.name_in(path, component.flat_naming).replace(".", "_")
            tensors[f"{stem}.alpha"] = ["F32", []]
            for factor, shape in (("w1_a", [layer.out_features, 4]), ("w1_b", [4, layer.in_features])):
                tensors[f"{stem}.hada_{factor}"] = ["F16", shape]
                tensors[f"{stem}.hada_{factor.replace('1', '2')}"] = ["F16", shape]
    result = loraformats.detect(header_bytes({"metadata": {}, "tensors": dict(sorted(tensors.items()))}))
    assert (result.format, result.family, result.algorithms) == ("lycoris", "sdxl", ["loha"])
    assert [c.dtypes for c in result.components] == [["F16"]]
    assert {d for g in result.groups for d in g.dtypes} == {"F16"}


def test_a_file_no_format_explains_is_unknown_with_every_candidate():
    result = loraformats.detect(header_bytes({"metadata": {}, "tensors": {"model.weight": ["F32", [4, 4]]}}))
    assert (result.format, result.family, result.confidence) == ("unknown", "unknown", 0.0)
    assert {c.name for c in result.formats} == set(registry.formats())
    assert all(c.against for c in result.formats)


def test_a_mostly_kohya_file_names_what_it_cannot_place():
    fixture = build(Layout("sd1", "kohya", selection="te"))
    fixture["tensors"]["bundle_emb.mychar.string_to_param.*"] = ["F16", [2, 768]]
    result = loraformats.detect(header_bytes(fixture))
    assert result.format == "kohya" and result.confidence < 0.5
    assert any("bundle_emb" in reason for reason in result.reasons)


# ------------------------------------------------------------------------------------------ inputs


def test_header_bytes_with_or_without_the_length_prefix_give_the_same_answer():
    raw = header_bytes(build(Layout("sd2", "diffusers", selection="unet_attention")))
    plain, prefixed = loraformats.detect(raw), loraformats.detect(len(raw).to_bytes(8, "little") + raw)
    assert plain == prefixed and plain.family == "sd2"


def test_alphas_need_the_file_not_just_its_header():
    with pytest.raises(UsageError, match="read_alphas needs the file"):
        loraformats.detect(header_bytes(build(Layout("sd1", "kohya", selection="te"))), read_alphas=True)


def test_alphas_are_read_only_on_request(tmp_path):
    path = write(build(Layout("sd1", "kohya", selection="te")), tmp_path / "lora.safetensors")
    with unreadable_data():
        assert loraformats.detect(path).alphas == {}
    counted = loraformats.detect(path, read_alphas=True)
    assert counted.alphas == {"4": 72}  # the data section is zeros: alpha 0 means alpha = rank
    assert all(g.alphas == {"4": g.modules} for g in counted.groups)


def test_a_peft_directory_is_detected_from_its_config_and_headers(tmp_path):
    recorded = json.loads((Path(__file__).parent / "headers" / "tools" / "peft_unet_sd1.json").read_text())
    root = write_files(recorded["files"], tmp_path / "adapter")
    result = loraformats.detect(root)
    assert (result.format, result.family, result.path) == ("peft", "tiny-sd1", str(root))
    assert result.metadata["unet/adapter_config.json:r"] == "4"


def test_a_directory_no_format_claims_is_unknown(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = loraformats.detect(tmp_path)
    assert (result.format, result.family) == ("unknown", "unknown")
    assert "no installed directory format claims this directory" in result.reasons


# ------------------------------------------------------------------------------------------ no data read


@pytest.mark.skipif(not unreadable.available(), reason="needs root and /dev/fuse")
def test_detection_works_when_the_data_section_cannot_be_read_at_all(tmp_path):
    """The file is served by a FUSE file system that fails every read inside the data section."""
    path = write(build(Layout("sdxl", "kohya", metadata="sd-scripts")), tmp_path / "lora.safetensors")
    (tmp_path / "mnt").mkdir()
    code = (
        "import loraformats\n"
        "result = loraformats.detect(path)\n"
        "assert (result.format, result.family) == ('kohya', 'sdxl'), result.reasons\n"
        "assert not server.refused, server.refused\n"
        "try:\n"
        "    loraformats.detect(path, read_alphas=True)\n"
        "except loraformats.OutputError as error:\n"
        "    print('alphas:', error)\n"
        "assert server.refused\n"
        "print('detected without reading data')\n"
    )
    script = Path(unreadable.__file__)
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(path), str(tmp_path / "mnt"), "--", code],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        unreadable.unmount(tmp_path / "mnt")
    if done.returncode == unreadable.CANNOT_MOUNT:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-2000:]
    assert "detected without reading data" in done.stdout
    assert "alphas: " in done.stdout and "Input/output error" in done.stdout


def test_corpus_detection_never_reads_tensor_data():
    with unreadable_data():
        for layout in LAYOUTS[::25]:
            assert loraformats.detect(header_bytes(build(layout))).format == layout.format


# ------------------------------------------------------------------------------------------ schema


def test_published_schemas_are_current():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_schemas.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "layout",
    [Layout("sdxl", "kohya", metadata="contradicting"), Layout("sd1", "kohya", selection="attn1"),
     Layout("sd2", "diffusers", spelling="attn_procs")],
    ids=["contradiction", "ambiguous", "legacy"],
)  # fmt: skip
def test_detect_json_validates_against_the_published_schema(layout, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "specs" / "detection.schema.json").read_text())
    path = write(build(layout), tmp_path / "lora.safetensors")
    assert main(["detect", "--json", str(path)]) == 0
    output = json.loads(capsys.readouterr().out)
    jsonschema.validate(output, schema)
    assert output["schema_version"] == 1 and output["family"] in ("sdxl", "ambiguous", "sd2")


def test_schema_version_1_keeps_its_original_fields():
    fields = set(json.loads((ROOT / "specs" / "detection.schema.json").read_text())["properties"])
    original = {"schema_version", "path", "format", "family", "algorithms", "components", "alphas",
                "metadata_keys", "tensors", "reasons", "formats", "families"}  # fmt: skip
    assert original <= fields
