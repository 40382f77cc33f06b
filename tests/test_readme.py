"""The README's usage example runs as written (with a tiny model and a short budget)."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    start = text.index("```python\n", text.index("## Usage")) + len("```python\n")
    code = text[start : text.index("```", start)]
    replacements = {
        "20_000": "300",
        "range(500)": "range(50)",
        "progress_bar=True": "progress_bar=False",
        'DreamerV2("MlpPolicy", env, verbose=1, seed=0)': (
            'DreamerV2("MlpPolicy", env, seed=0, learning_starts=100, batch_size=4, sequence_length=8, '
            "policy_kwargs=dict(deter_size=32, hidden_size=32, stoch_size=4, classes=4, mlp_layers=1, mlp_units=32))"
        ),
    }
    for old, new in replacements.items():
        assert old in code, f"README usage example changed: {old!r} not found"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "dreamerv2_cartpole.zip").exists() and (tmp_path / "vecnormalize.pkl").exists()
    assert namespace["mean"] > 0 and namespace["state"] is not None
