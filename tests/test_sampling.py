"""generate(): prefill + jitted decode loop against repeated full forwards; the workdir CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gla_jax import GLALM, GLAConfig
from gla_jax.sampling import generate, load_model_from_workdir, main, sample_logits

VOCAB = 37
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, dtype="float32", init_std=0.3)
PROMPTS = [[5, 9, 2, 30, 11, 7, 1], [3], [8, 8, 15, 22]]

last_logits = nnx.jit(lambda model, tokens: model(tokens)[:, -1])
# Logits at one position of a zero-padded row: causality makes the padding inert, and one padded
# length means one compile.
logits_at = nnx.jit(lambda model, tokens, index: model(tokens)[0, index])
PADDED = 24


def _greedy_by_full_forward(model, prompt, steps, eos=None):
    """The slow, obviously right way: rerun the whole sequence for every new token."""
    seq, out = list(prompt), []
    for _ in range(steps):
        if out and eos is not None and out[-1] == eos:
            out.append(eos)
            continue
        padded = np.zeros((1, PADDED), np.int32)
        padded[0, : len(seq)] = seq
        token = int(jnp.argmax(logits_at(model, jnp.asarray(padded), len(seq) - 1)))
        seq.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("mixer, conv", [("gla", True), ("attention", False)])
def test_greedy_generation_matches_repeated_full_forwards(mixer, conv):
    model = GLALM(GLAConfig(**SMALL, mixer=mixer, use_short_conv=conv), rngs=nnx.Rngs(0))
    out = np.asarray(generate(model, PROMPTS, max_new_tokens=6, temperature=0.0))
    assert out.shape == (3, 6) and out.dtype == np.int32
    for prompt, row in zip(PROMPTS, out, strict=True):
        assert row.tolist() == _greedy_by_full_forward(model, prompt, 6)
    # The same prompts given as a right-padded array with lengths.
    padded = np.zeros((3, 7), np.int32)
    for i, prompt in enumerate(PROMPTS):
        padded[i, : len(prompt)] = prompt
    again = generate(model, padded, 6, temperature=0.0, prompt_lengths=[7, 1, 4])
    np.testing.assert_array_equal(again, out)
    # top_k = 1 is greedy whatever the temperature.
    top1 = generate(model, PROMPTS, 6, rng=jax.random.key(3), temperature=2.0, top_k=1)
    np.testing.assert_array_equal(top1, out)


def test_generation_stops_rows_at_eos():
    model = GLALM(GLAConfig(**SMALL), rngs=nnx.Rngs(0))
    free = np.asarray(generate(model, PROMPTS, 8, temperature=0.0))
    eos = int(free[0, 2])
    out = np.asarray(generate(model, PROMPTS, 8, temperature=0.0, eos=eos))
    for prompt, row in zip(PROMPTS, out, strict=True):
        assert row.tolist() == _greedy_by_full_forward(model, prompt, 8, eos=eos)
    assert out[0, 2:].tolist() == [eos] * 6


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)

    def freq(temperature, top_k, top_p):
        samples = jax.vmap(lambda k: sample_logits(logits, k, temperature, top_k, top_p)[0])(keys)
        return np.bincount(np.asarray(samples), minlength=4) / len(keys)

    np.testing.assert_allclose(freq(1.0, 0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_allclose(freq(1.0, 2, 1.0), [0.625, 0.375, 0, 0], atol=0.03)
    # Nucleus 0.7: the smallest prefix reaching 0.7 is {0, 1}.
    np.testing.assert_allclose(freq(1.0, 0, 0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(freq(1.0, 0, 0.1), [1, 0, 0, 0])
    assert int(sample_logits(logits, keys[0], 0.0, 0, 1.0)[0]) == 0
    # A tiny temperature is nearly greedy, not NaN probabilities from logits / 1e-45 = -inf.
    np.testing.assert_allclose(freq(1e-45, 0, 1.0), [1, 0, 0, 0])
    np.testing.assert_allclose(freq(1e-45, 0, 0.9), [1, 0, 0, 0])


def test_generate_rejects_bad_arguments():
    model = GLALM(GLAConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"prompt_lengths.*\[1, 3\]"):
        generate(model, np.ones((2, 3), np.int32), 4, prompt_lengths=[3, 4])
    with pytest.raises(ValueError, match=r"token ids.*\[0, 37\)"):
        generate(model, [[1, 2, 40]], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], 4, top_p=0.0)
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite temperature >= 0"):
            generate(model, [[1, 2]], 4, temperature=temperature)
    for eos in (-1, 37):
        with pytest.raises(ValueError, match=r"eos must be a token id in \[0, 37\)"):
            generate(model, [[1, 2]], 4, eos=eos)
    with pytest.raises(ValueError, match=r"top_k must be at most the vocabulary \(37\)"):
        generate(model, [[1, 2]], 4, top_k=38)
    with pytest.raises(ValueError, match="top_k must be an integer >= 0, got 1.5"):
        generate(model, [[1, 2]], 4, top_k=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 2.7"):
        generate(model, [[1, 2]], 2.7)


def _write_run(workdir, model_config):
    """A workdir as the trainer leaves it: config.json and an Orbax 'state' with 'params'."""
    from gla_jax.checkpoint import Checkpointer  # noqa: PLC0415
    from gla_jax.model import build_model  # noqa: PLC0415

    config = ml_collections.ConfigDict({"seq_len": 32, "model": model_config})
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = build_model(config.model, nnx.Rngs(7))
    state = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "step": jnp.array(5, jnp.int32),
    }
    checkpointer = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    checkpointer.save(5, state, {"position": 0})
    checkpointer.close()
    return model


def test_load_model_from_workdir_and_cli(tmp_path, capsys):
    model_config = dict(type="gla", **SMALL, tie_embeddings=True, backend=None)
    model = _write_run(tmp_path, model_config)
    loaded, config = load_model_from_workdir(str(tmp_path))
    assert config.model.d_model == 32
    tokens = jnp.asarray([[1, 4, 9, 16, 25]])
    np.testing.assert_allclose(last_logits(loaded, tokens), last_logits(model, tokens), rtol=1e-6)

    main(
        [
            f"--workdir={tmp_path}",
            "--prompt_ids=1,2,3",
            "--num_samples=2",
            "--max_new_tokens=4",
            "--temperature=0",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    want = [1, 2, 3] + _greedy_by_full_forward(model, [1, 2, 3], 4)
    assert [json.loads(line.replace("'", '"')) for line in lines[-2:]] == [want, want]


def test_cli_refuses_zero_samples(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"--workdir={tmp_path}", "--num_samples=0"])
    assert "--num_samples must be >= 1, got 0" in capsys.readouterr().err
