"""scripts/eval_distortion.py: its tables hold the numbers they claim, and rewriting QUALITY.md keeps
other sections."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_distortion.py"


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("eval_distortion", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def table_rows(lines):
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| ") and "---" not in ln][1:]


@pytest.mark.slow
def test_synthetic_table_measures_the_optimum(ev):
    rows = table_rows(ev.synthetic_turboquant(2000))
    assert len(rows) == 12  # d in {64, 128, 256} x b in 1..4
    for r in rows:
        measured, optimum = float(r[2]), float(r[3])
        assert measured == pytest.approx(optimum, rel=0.05)
        gauss, orth, theory = float(r[7]), float(r[8]), float(r[9])
        assert gauss == pytest.approx(theory, rel=0.12)  # 2000 pairs: standard error ~3%
        assert orth < 0.5 * gauss


def test_registry_table_covers_every_type(ev):
    from tqinfer.quant import codec_names

    rows = table_rows(ev.synthetic_registry(2000))
    assert [r[0] for r in rows] == codec_names()


def test_write_section_keeps_other_sections_and_notes(ev, tmp_path):
    p = tmp_path / "QUALITY.md"
    p.write_text("# Quality\n\n## Perplexity\nppl table\n\n## Codec distortion\n\nold\n\n### Notes\nmine\n\n"
                 "## Speed\nfast\n")
    ev.write_section(p, ["new table"])
    text = p.read_text()
    assert "old" not in text and "new table" in text
    assert "ppl table" in text and "## Speed\nfast" in text and "### Notes\nmine" in text
    fresh = tmp_path / "NEW.md"
    ev.write_section(fresh, ["t"])
    assert fresh.read_text().startswith("# Quality\n\n## Codec distortion\n\nt")
