"""Inputs are checked before any model loads: one line that names the field, what was got, the rule and the fix;
exit code 2, no traceback; nothing is silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dit_sparse.integration.pipelines.presets import PRESETS, TINY_PRESET_PREFIX, default_preset_for
from dit_sparse.tiny.model import ASSET_DIR
from dit_sparse.tools import render
from dit_sparse.tools.cli import main
from dit_sparse.tools.jobs import Job, JobError, SetupError, load_jobs
from dit_sparse.tools.model_rules import ModelRules, read_model_rules
from dit_sparse.tools.words import speed_words


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model starts loading: every check must come first."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(render.Renderer, "__init__", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own checks (choices, int parsing)
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flags, expect", [
    (["--steps", "0"], ["--steps", "got 0", ">= 1"]),
    (["--steps", "-3"], ["--steps", "got -3"]),
    (["--frames", "0"], ["--frames", "got 0"]),
    (["--frames", "-5"], ["--frames", "got -5"]),
    (["--frames", "10"], ["--frames", "got 10", "4k + 1", "use 9 or 13"]),
    (["--frames", "100000"], ["--frames", "got 100000", "rotary position", "at most 509"]),
    (["--size", "64by64"], ["--size", "832x480"]),
    (["--size", "60x64"], ["--size", "got 60", "multiple of 16", "use 48 or 64"]),
    (["--size", "64x9000"], ["--size", "got 9000", "rotary"]),
    (["--prompt", ""], ["--prompt", "non-empty"]),
    (["--prompt", "   "], ["--prompt", "non-empty"]),
    (["--fps", "0"], ["--fps", "got 0", ">= 1"]),
    (["--seed", str(2**70)], ["--seed", "2**64 - 1"]),
    (["--seed", "-1"], ["--seed", "got -1"]),
    (["--guidance-scale", "nan"], ["--guidance-scale", "finite"]),
    (["--preset", "tiny-wan:draft-rect-8"], ["--preset", "did you mean 'tiny-wan:draft-rect-80'"]),
    (["--preset", "hunyuanvideo:draft-90"], ["--preset", "hunyuanvideo preset", "wan"]),
    (["--dtype", "float64"], ["--dtype", "float32"]),
    (["--steps", "2.5"], ["--steps", "invalid int value"]),
])
def test_bad_cli_values_fail_before_loading(flags, expect, tmp_path, capsys, no_model):
    rc, err = run_cli(["render", "--out", str(tmp_path), *flags], capsys)
    assert rc == 2
    line = one_line_error(err)
    for word in expect:
        assert word in line, (word, line)
    assert not any(tmp_path.iterdir())  # nothing rendered, nothing written


def job_file(tmp_path: Path, lines: list[str], suffix=".jsonl") -> Path:
    p = tmp_path / f"jobs{suffix}"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("line, expect", [
    ('{"prompt": "a red circle moving right", "steps": 2.5}', ["jobs.jsonl:2", "steps", "got 2.5", "integer"]),
    ('{"prompt": "a red circle moving right", "frames": [1, 2]}', ["jobs.jsonl:2", "frames", "[1, 2]"]),
    ('{"prompt": "a red circle moving right", "seed": "abc"}', ["jobs.jsonl:2", "seed", "'abc'", "2**64 - 1"]),
    ('{"prompt": "a red circle moving right", "size": "64by64"}', ["jobs.jsonl:2", "size", "832x480"]),
    ('{"prompt": "a red circle moving right", "stepz": 3}', ["jobs.jsonl:2", "unknown key 'stepz'",
                                                             "did you mean 'steps'"]),
    ('{"prompt": "a red circle moving right", "frames": -5}', ["jobs.jsonl:2", "frames", "got -5"]),
    ('{"prompt": "a red circle moving right", "frames": 10}', ["jobs.jsonl:2", "frames", "4k + 1"]),
    ('{"prompt": "a red circle moving right", "steps": 0}', ["jobs.jsonl:2", "steps", "got 0"]),
    ('{"prompt": ""}', ["jobs.jsonl:2", "prompt", "non-empty"]),
    ('{"seed": 1}', ["jobs.jsonl:2", "prompt", "missing"]),
    ('["a red circle moving right"]', ["jobs.jsonl:2", "expected an object"]),
    ('{"prompt": "a red circle", "preset": "tiny-wan:draft75"}', ["jobs.jsonl:2", "preset",
                                                                  "did you mean 'tiny-wan:draft-75'"]),
    ('{not json}', ["jobs.jsonl:2", "not valid JSON"]),
])
def test_bad_job_lines_name_file_line_field(line, expect, tmp_path, capsys, no_model):
    jobs = job_file(tmp_path, ['{"prompt": "a blue square moving left", "steps": 2}', line])
    rc, err = run_cli(["render", "--jobs", str(jobs), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2
    msg = one_line_error(err)
    for word in expect:
        assert word in msg, (word, msg)
    assert not (tmp_path / "out").exists()


def test_yaml_errors_name_the_index_and_line(tmp_path):
    y = job_file(tmp_path, ["- prompt: a red circle moving up", "- prompt: a blue square", "  steps: two"],
                 ".yaml")
    with pytest.raises(JobError, match=r"jobs\.yaml\[1\]: steps: got 'two'"):
        load_jobs(y)
    bad = job_file(tmp_path, ["- prompt: [unclosed"], ".yml")
    with pytest.raises(JobError, match=r"jobs\.yml:\d+: not valid YAML"):
        load_jobs(bad)
    with pytest.raises(SetupError, match="does not exist"):
        load_jobs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("setup, expect", [
    ("missing_jobs", "does not exist"),
    ("out_under_file", "--out"),
    ("model_missing", "no such folder"),
    ("model_not_diffusers", "no model_index.json"),
    ("model_is_file", "is a file"),
    ("model_needs_prompt", "--prompt: missing"),
    ("cuda", "no CUDA device"),
    ("bad_device", "not a device name"),
])
def test_setup_failures_one_line_exit_2(setup, expect, tmp_path, capsys, no_model):
    import torch

    argv = ["render", "--out", str(tmp_path / "out")]
    if setup == "missing_jobs":
        argv += ["--jobs", str(tmp_path / "nope.jsonl")]
    elif setup == "out_under_file":
        (tmp_path / "f").write_text("x")
        argv = ["render", "--out", str(tmp_path / "f" / "sub")]
    elif setup == "model_missing":
        argv += ["--model", str(tmp_path / "no-such-model"), "--prompt", "x"]
    elif setup == "model_not_diffusers":
        (tmp_path / "empty").mkdir()
        argv += ["--model", str(tmp_path / "empty"), "--prompt", "x"]
    elif setup == "model_is_file":
        (tmp_path / "weights.bin").write_bytes(b"0")
        argv += ["--model", str(tmp_path / "weights.bin"), "--prompt", "x"]
    elif setup == "model_needs_prompt":
        argv += ["--model", str(ASSET_DIR)]
    elif setup == "cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        argv += ["--device", "cuda"]
    elif setup == "bad_device":
        argv += ["--device", "gpu0"]
    rc, err = run_cli(argv, capsys)
    assert rc == 2
    assert expect in one_line_error(err)


def test_model_rules_of_the_embedded_folder_match_the_pipeline():
    """The rules read from JSON (no weights) equal those of the loaded pipeline."""
    from dit_sparse.tiny.model import build_pipeline

    from_json = read_model_rules(str(ASSET_DIR))
    loaded = render.rules_of_pipeline(build_pipeline(), from_json.defaults)
    assert from_json == loaded
    assert (from_json.temporal_factor, from_json.size_multiple, from_json.rope_max) == (4, 16, 128)
    assert from_json.size_class == "toy" and from_json.family == "wan"
    job = Job(prompt="x", frames=17, height=64, width=64)
    assert from_json.latent_grid(17, 64, 64) == (5, 8, 8) and from_json.tokens(job) == 320
    from_json.check(Job(prompt="x", frames=from_json.max_input("frames")))
    with pytest.raises(JobError, match="rotary"):
        from_json.check(Job(prompt="x", frames=from_json.max_input("frames") + 4))


def test_default_preset_follows_family_and_size():
    """Never the toy preset for a real model; the reason is given."""
    for fam, size, experts in [("wan", "small", 1), ("wan", "large", 1), ("wan", "large", 2), ("wan", "unknown", 1)]:
        name, why = default_preset_for(fam, size, experts=experts, params=1.4e9)
        assert not name.startswith(TINY_PRESET_PREFIX) and PRESETS[name].family == "wan" and why
    assert default_preset_for("wan", "small")[0] == "wan2.1-t2v-1.3b:draft-80"
    assert default_preset_for("wan", "large")[0] == "wan2.1-t2v-14b:rectified-75"
    assert default_preset_for("wan", "large", experts=2)[0] == "wan2.2-t2v-a14b:rectified-85"
    assert default_preset_for("wan", "toy")[0].startswith(TINY_PRESET_PREFIX)
    from dit_sparse.integration.adapters.registry import FAMILIES

    for fam in {p.family for p in PRESETS.values()}:  # every family with presets has a default
        assert fam in FAMILIES and PRESETS[default_preset_for(fam, "small")[0]].family == fam
    with pytest.raises(LookupError, match="--preset"):
        default_preset_for(None, "small")
    # a real-size Wan config read like a folder: the 1.3B shape is "small", 14B "large"
    wan13 = ModelRules.from_configs("WanPipeline", "WanTransformer3DModel",
                                    {"num_attention_heads": 12, "attention_head_dim": 128, "num_layers": 30,
                                     "ffn_dim": 8960, "patch_size": [1, 2, 2]}, {})
    wan14 = ModelRules.from_configs("WanPipeline", "WanTransformer3DModel",
                                    {"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40,
                                     "ffn_dim": 13824, "patch_size": [1, 2, 2]}, {})
    assert (wan13.size_class, wan14.size_class) == ("small", "large")
    assert 1.2e9 < wan13.params < 1.6e9 and 12e9 < wan14.params < 16e9


def test_real_model_on_cpu_warns_with_an_estimate(tmp_path, capsys, monkeypatch):
    """A 1.3B-class Wan folder (configs only) on CPU: the estimate is printed before anything loads."""
    import shutil

    folder = tmp_path / "wan13"
    shutil.copytree(ASSET_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors", "render_defaults.json"))
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg.update(num_attention_heads=12, attention_head_dim=128, num_layers=30, ffn_dim=8960, patch_size=[1, 2, 2],
               rope_max_seq_len=1024)
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg))
    loaded = []
    monkeypatch.setattr(render.Renderer, "__init__", lambda *a, **k: loaded.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    rc = main(["render", "--model", str(folder), "--prompt", "a fox", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 130 and loaded  # the warning came first, then loading started (and was interrupted here)
    assert "using 'wan2.1-t2v-1.3b:draft-80' because" in err and "1.3B class" in err
    assert "832x480, 81 frames, 50 steps" in err  # the pipeline's defaults, said out loud
    assert "warning:" in err and "on CPU" in err and "TFLOP" in err and "--device cuda" in err


def test_speed_words():
    assert speed_words(1.25) == "1.25x faster"
    assert speed_words(0.8) == "1.25x slower"
    assert speed_words(1.0) == "1.00x faster"


def test_ray_path_takes_the_prompt_with_a_model(tmp_path, monkeypatch):
    """`render --ray --model <folder> --prompt ...` reaches the Ray driver with that prompt (it used to stop at
    "--prompt is required with --model": the default prompt was looked up before --prompt was read)."""
    import dit_sparse.tools.ray_batch as distributed

    seen = {}

    def fake_ray(jobs, out, **kw):
        seen.update(jobs=jobs, **kw)
        return {"jobs": 1, "done": 1, "skipped": 0, "failed": 0, "results": []}

    monkeypatch.setattr(distributed, "render_jobs_ray", fake_ray)
    assert main(["render", "--ray", "--model", str(ASSET_DIR), "--prompt", "a fox in the snow", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    assert [j.prompt for j in seen["jobs"]] == ["a fox in the snow"] and seen["preset"] == "tiny-wan:draft-rect-80"


def test_job_checks_and_the_hub_id_rule_import_no_torch(tmp_path):
    """Loading a job file and the hub-id rule of the pipeline loader stay torch-free."""
    import subprocess
    import sys

    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a red circle moving right"}\n')
    probe = ("import sys\nfrom dit_sparse.tools.jobs import load_jobs\n"
             "from dit_sparse.integration.pipelines.loaders import looks_like_hub_id\n"
             "print(len(load_jobs('jobs.jsonl')), looks_like_hub_id('Wan-AI/Wan2.1-T2V-1.3B-Diffusers'),\n"
             "      sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "[]"]
