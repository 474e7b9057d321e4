"""The documents: what the docstrings cite exists, and the README stays short, ordered for users, with every command in it checked."""

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_method_notes_named_in_the_code_are_in_the_repository():
    """Docstrings once sent readers to a METHOD.md that the repository does not ship; they now cite the paper and the
    authors' files instead, or the document must be added."""
    shipped = {path.name for path in ROOT.rglob("*.md")}
    mentions = [
        f"{path.relative_to(ROOT)}: {name}"
        for folder in ("src", "examples", "tests", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path != Path(__file__).resolve()
        for name in re.findall(r"[\w./-]*METHOD\.md", path.read_text())
        if Path(name).name not in shipped
    ]
    assert not mentions, mentions


def readme_commands():
    """The shell commands of README.md's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_is_short_and_ordered_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    order = ["## Install", "## Use a model", "## Train on your own images", "## The offline demo",
             "## The paper's recipes", "## The authors' checkpoints", "## The Hub", "## Documentation"]
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions)
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", text):
        assert (ROOT / link).is_file(), link


def test_every_training_command_in_the_readme_resolves_as_a_run_would(capsys):
    """Each `weaktr-train` / `accelerate launch ... train` line of the README parses and passes the recipe's checks
    (what `--print_config` does); the data and weights they name are not needed for that."""
    from weaktr_hf.train import main

    training = [c for c in readme_commands() if c.startswith(("weaktr-train", "accelerate launch"))]
    assert len(training) >= 5
    for command in training:
        words = shlex.split(command)
        start = next(i for i, word in enumerate(words) if word.endswith(("train.py", "weaktr_hf.train", "weaktr-train")))
        argv = [word for word in words[start + 1:] if word not in ("--push_to_hub",)]
        assert main([*argv, "--print_config"]) is None, command
        json.loads(capsys.readouterr().out)


def test_every_predict_and_convert_command_in_the_readme_parses():
    from weaktr_hf import convert_weaktr_original_to_hf, predict

    parsers = {"weaktr-predict": predict.parse_args, "weaktr-convert": convert_weaktr_original_to_hf.parse_args}
    seen = set()
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] in parsers:
            parsers[words[0]](words[1:])
            seen.add(words[0])
    assert seen == set(parsers)


def test_the_readmes_summary_command_names_its_columns(tmp_path, capsys):
    """`summarize_runs.py` takes LABEL=RUN[,RUN...]: the README's command, pointed at finished runs, prints the table."""
    from conftest import load_example

    summarize = load_example("summarize_runs.py", "summarize_runs")
    commands = [shlex.split(c) for c in readme_commands() if "summarize_runs.py" in c]
    assert commands
    for words in commands:
        argv = words[words.index("examples/summarize_runs.py") + 1:]
        for index, item in enumerate(argv):
            label, _, folders = item.partition("=")
            rewritten = []
            for folder in folders.split(","):
                run = tmp_path / str(index) / Path(folder).name
                run.mkdir(parents=True)
                (run / "all_results.json").write_text(json.dumps({"seg_val_miou_ms_flip": 0.5}))
                rewritten.append(str(run))
            argv[index] = f"{label}={','.join(rewritten)}"
        summarize.main(argv)
        assert "| segmentation, multi-scale + flip (val) | 50.0 ± 0.0 (3; 50.0-50.0) |" in capsys.readouterr().out
