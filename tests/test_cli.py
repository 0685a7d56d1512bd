"""Issue 10: every script answers bad input with one line ``error: ...`` (exit status 1), never a
traceback, and finds what it can before loading the model; train --package_to and a refused
sweep destroy nothing. The scripts run in subprocesses (their flags clash in one process)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", PLATEAU_JAX_NO_PROGRESS="1",
               JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _drive(module, cases, **env):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_driver.py"), module,
                          json.dumps(cases)], cwd=ROOT, env=_env(**env), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def _check(results, expected):
    for r, want in zip(results, expected):
        err = [l for l in r["stderr"].splitlines() if l.startswith("error:")]
        assert "Traceback" not in r["stderr"], (r["argv"], r["stderr"][-2000:])
        assert r["status"] == 1, (r["argv"], r["status"], r["stderr"][-2000:])
        assert len(err) == 1 and want in err[0], (r["argv"], want, r["stderr"][-2000:])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "pairs.txt").write_text("context,ending_a,ending_b\n")
    (d / "bad.jsonl").write_text("{not json\n[1]\n")
    (d / "unknown.jsonl").write_text(json.dumps({"context": "The house was", "ending_a": " qqqzzz",
                                                 "ending_b": " in"}) + "\n")
    (d / "empty_corpus").mkdir()
    return d


def test_error_format_of_every_script(files, tmp_path, plateau_dir):
    out = str(tmp_path / "out")
    model = f"--model={plateau_dir}"  # 3 layers
    unwritable = "--output_dir=/proc/plateau-out"
    cases = {
        "experiments.plateaus": [
            ([], "--output_dir is required (see --helpfull)"),
            ([f"--output_dir={out}", "--path=cubic"], "flag --path=cubic: value should be one of"),
            ([f"--output_dir={out}", model, "--layer=2"], "--layer=2 with --site=resid_post leaves no"),
            ([f"--output_dir={out}", "--alphas=0,nan,1"], "alpha grid must be finite"),
            ([f"--output_dir={out}", "--pairs=big:in,big:in"], "given twice"),
            ([unwritable], "cannot be written"),
            ([f"--output_dir={out}", "--model=/nonexistent-model"], "/nonexistent-model"),
            ([f"--output_dir={out}", model, "stray"], "unexpected arguments ['stray']"),
        ],
        "experiments.jacobians": [
            ([f"--output_dir={out}", "--figure_format=bogus"], "flag --figure_format=bogus"),
            ([f"--output_dir={out}", "--families=mlp,foo"], "--families: unknown ['foo']"),
            ([f"--output_dir={out}", "--stats=topk"], "top_k < 1"),
            ([f"--output_dir={out}", "--full=cumulative", "--nocumulative"], "needs cumulative=True"),
            ([f"--output_dir={out}", "--steps=1"], "--steps=1: expected an integer >= 2"),
            ([f"--output_dir={out}", model, "--layer=2"], "--layer must be in 0..1"),
            ([f"--output_dir={out}", model, "--layer=-1"], "--layer=-1"),
            ([f"--output_dir={out}", model, "--pairs=big:elephant"], "tokenises as"),
            ([unwritable, model], "cannot be written"),
            ([f"--output_dir={out}", "--model=/nonexistent-model"], "/nonexistent-model"),
        ],
        "experiments.sweep": [
            ([f"--output_dir={out}"], "give exactly one of --pairs_file"),
            ([f"--output_dir={out}", "--pairs_file=/nonexistent.jsonl"], "no such file"),
            ([f"--output_dir={out}", f"--pairs_file={files}/pairs.txt"], "unknown extension '.txt'"),
            ([f"--output_dir={out}", f"--pairs_file={files}/bad.jsonl"],
             "no readable pairs (line 1: invalid JSON"),
            ([f"--output_dir={out}", model, f"--pairs_file={files}/unknown.jsonl"],
             "no valid pairs in"),
            ([f"--output_dir={out}", "--generate=text"], "--generate=text needs --text_file"),
            ([f"--output_dir={out}", "--generate=topk", "--k=1"], "--k=1: expected an integer >= 2"),
            ([f"--output_dir={out}", model, "--generate=topk", "--layers=3"],
             "layers [3] are out of range"),
            ([f"--output_dir={out}", "--generate=topk", "--layers=a"], "--layers=a"),
            ([f"--output_dir={out}", "--generate=topk", "--n_steps=1"], "need at least 2 steps"),
            ([f"--output_dir={out}", "--generate=topk", "--tol=0.02"], "sharpness_width/2"),
            ([f"--output_dir={out}", "--generate=topk", "--plateau_tol=0.7"], "--plateau_tol=0.7"),
            ([f"--output_dir={out}", "--generate=topk", "--batch_size=0"], "--batch_size=0"),
            ([f"--output_dir={out}", "--generate=random", "--word_list=/nonexistent"],
             "--word_list=/nonexistent: no such file"),
            ([unwritable, "--generate=topk"], "cannot be written"),
        ],
        "experiments.sweep_report": [
            ([f"--output_dir={tmp_path}/nonexistent"], "no such directory"),
            ([f"--output_dir={files}"], "holds no manifest.json: not a sweep directory"),
        ],
        "experiments.train": [
            ([], "--output_dir is required"),
            ([f"--output_dir={out}", "--n_head=5"], "must be a multiple of --n_head=5"),
            ([f"--output_dir={out}", "--save_steps=0,x"], "--save_steps=0,x"),
            ([f"--output_dir={out}", "--tokenizer_dir=/nonexistent"], "no such directory"),
            ([f"--output_dir={out}", f"--corpus_dir={files}/empty_corpus"], "was not found in"),
            ([f"--output_dir={out}", "--package_only"], "needs --package_to"),
        ],
        "experiments.emergence": [
            ([f"--output_dir={out}"], "give exactly one of --model with --revisions"),
            ([f"--output_dir={out}", "--model=gpt2"], "--model and --revisions go together"),
            ([f"--output_dir={out}", "--run_dir=/nonexistent"], "--run_dir=/nonexistent: no such"),
            ([f"--output_dir={out}", f"--run_dir={files}"], "No checkpoints under"),
        ],
        "experiments.directions": [
            ([f"--output_dir={out}", "--types=real,sideways"], "--types"),
            ([f"--output_dir={out}", "--n_lengths=0"], "--max_length/--n_lengths"),
            ([f"--output_dir={out}", "--layer=9"], "--layer=9 is out of range"),
            ([f"--output_dir={out}", "--prompts_file=/nonexistent.txt"], "does not exist"),
            ([unwritable], "cannot be written"),
        ],
        "experiments.slices": [
            ([f"--output_dir={out}", "--grid=0"], "at least 1 point"),
            ([f"--output_dir={out}", "--endings=big,in"], "needs 3 distinct"),
        ],
    }
    for module, items in cases.items():
        results = _drive(module, [argv for argv, _ in items])
        _check(results, [want for _, want in items])
    # nothing written by any refusal (lock files aside)
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if not f.endswith(".lock")]


def test_real_process_prints_one_error_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "experiments.jacobians",
                          f"--output_dir={tmp_path}", "--figure_format=bogus"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "error: flag --figure_format=bogus: value should be one of <png|pdf|svg> (see --helpfull)"]
    res = subprocess.run([sys.executable, "-m", "experiments.sweep_report",
                          f"--output_dir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path} holds no manifest.json")
    assert "Traceback" not in res.stderr


def _wordnet_corpus(directory, n=400):
    """A corpus in WordNet's data.* format with n synsets (a few are held out by hash)."""
    os.makedirs(directory)
    line = "{:08d} 06 n 01 thing{} 0 000 | a thing number {}; \"the thing {} is here\"  \n"
    for i, name in enumerate(("data.noun", "data.verb", "data.adj", "data.adv")):
        with open(os.path.join(directory, name), "w") as f:
            f.write("  1 This is a licence header line\n")
            for k in range(n // 4):
                j = i * n + k
                f.write(line.format(j, j, j, j))


def test_train_package_to_checks_everything_before_writing(tmp_path):
    """Issue 10, defect 4: a run without summary.json is refused before heldout_sample.txt (or
    anything else) in --package_to is touched; another run's model needs --overwrite."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "final" / "model.safetensors").write_bytes(b"x")
    dest = tmp_path / "shipped"
    dest.mkdir()
    sample = "held-out text\n" * 2200  # 30 KB
    (dest / "heldout_sample.txt").write_text(sample)
    (dest / "config.json").write_text('{"model": "old"}')
    corpus = tmp_path / "corpus"
    _wordnet_corpus(str(corpus))
    base = [f"--output_dir={run}", "--package_only", f"--package_to={dest}",
            f"--corpus_dir={corpus}"]
    results = _drive("experiments.train", [base + ["--overwrite"], base])
    _check(results, ["is not a finished training run: missing", "is not a finished training run"])
    assert "summary.json" in results[0]["stderr"]
    for name in ("summary.json", "metrics.jsonl", "config.json"):
        (run / name).write_text("{}\n" if name != "metrics.jsonl" else '{"step": 0}\n')
    results = _drive("experiments.train", [base])
    _check(results, ["already holds a model from another training run; pass --overwrite"])
    assert (dest / "heldout_sample.txt").read_text() == sample
    assert (dest / "config.json").read_text() == '{"model": "old"}'
    results = _drive("experiments.train", [base + ["--overwrite"]])
    assert results[0]["status"] == 0, results[0]["stderr"][-2000:]
    assert (dest / "config.json").read_text() == "{}"
    assert (dest / "heldout_sample.txt").read_text().startswith("thing")
    assert json.loads((dest / "training_summary.json").read_text())["metrics"] == [{"step": 0}]
