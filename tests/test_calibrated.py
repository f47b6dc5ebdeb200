"""Activation-aware compression: whitening, budgets, ridge, closed-loop refit, and the CLI around them."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import build_bert, build_llama
from lora_compress.calibrate.collectors import GradientCovariance, StatisticsHooks, collectors_for, shrunk_covariance
from lora_compress.calibrate.tokens import calibration_tokens
from lora_compress.core.svd import cholesky_factor, factorize
from lora_compress.core.whitening import Whitening
from lora_compress.errors import LoraCompressError
from lora_compress.methods.allocate import LayerCost, allocate
from lora_compress.methods.config import CompressConfig, RunConfig, resolve
from lora_compress.pipelines.plan import compress_
from lora_compress.storage.compressed import load
from helpers import run


def correlated_inputs(tokens=400, features=24, seed=0) -> torch.Tensor:
    """Inputs with a few strong, correlated directions, like real activations."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, features, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(features, features, generator=g, dtype=torch.float64))[0]
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) * scales @ mixing  # (N, in)


def output_error(factors, W, X_c, X_d=None, weights=None) -> float:
    X_d = X_c if X_d is None else X_d
    diff = factors.B.double() @ factors.A.double() @ X_c.T - W.double() @ X_d.T  # (out, N)
    w = torch.ones(W.shape[0], dtype=torch.float64) if weights is None else weights.double()
    return float((diff.pow(2).sum(1) * w).sum().sqrt())


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 24, generator=g, dtype=torch.float64), correlated_inputs()


@pytest.mark.parametrize("rank", [2, 5, 10])
def test_whitened_error_beats_plain_svd_and_matches_the_optimum(layer, rank):
    W, X = layer
    whitened = Whitening(W, X.T @ X).factors(rank)
    plain = factorize(W, rank, compute_dtype=torch.float64)
    optimum = torch.linalg.svdvals(W @ X.T)[rank:].pow(2).sum().sqrt()  # best rank-r approximation of W·Xᵀ
    assert output_error(plain, W, X) > 1.05 * output_error(whitened, W, X)
    assert output_error(whitened, W, X) == pytest.approx(float(optimum), rel=1e-6)


def test_weighted_spectrum_is_the_whitened_truncation_loss(layer):
    W, X = layer
    power = Whitening(W, X.T @ X).spectrum()
    factors = Whitening(W, X.T @ X).factors(4)
    assert float(power[4:].sum().sqrt()) == pytest.approx(output_error(factors, W, X), rel=1e-6)


def test_channel_weights_lower_the_weighted_error(layer):
    W, X = layer
    weights = torch.logspace(2, -2, W.shape[0], dtype=torch.float64)
    weighted = Whitening(W, X.T @ X, weights=weights).factors(4)
    unweighted = Whitening(W, X.T @ X).factors(4)
    assert output_error(weighted, W, X, weights=weights) < output_error(unweighted, W, X, weights=weights)


def _covariance_error(factors, W, X, covariance) -> float:
    """‖(W − B·A)·Xᵀ‖ in the metric of an output covariance F: √trace(Dᵀ·F·D)."""
    diff = (W.double() - factors.B.double() @ factors.A.double()) @ X.T  # (out, N)
    return float((diff * (covariance @ diff)).sum().sqrt())


def test_output_covariance_weighting_finds_the_optimum_the_diagonal_misses(layer):
    W, X = layer
    gradients = correlated_inputs(tokens=300, features=W.shape[0], seed=2)  # (N, out): correlated output gradients
    F = gradients.T @ gradients
    full = Whitening(W, X.T @ X, weights=F, damping=0.0).factors(4)  # undamped: the metric is F itself
    diagonal = Whitening(W, X.T @ X, weights=F.diagonal()).factors(4)
    R = torch.linalg.cholesky(F)
    optimum = torch.linalg.svdvals(R.T @ W @ X.T)[4:].pow(2).sum().sqrt()  # best rank 4 in that metric
    assert _covariance_error(full, W, X, F) == pytest.approx(float(optimum), rel=1e-6)
    assert _covariance_error(diagonal, W, X, F) > 1.05 * _covariance_error(full, W, X, F)
    assert float(Whitening(W, X.T @ X, weights=F).spectrum()[4:].sum().sqrt()) == pytest.approx(float(optimum), rel=1e-6)


def _gradient_statistics(model, collector) -> dict:
    """``collector``'s statistics of every target over a whole-model forward and backward (the model's loss)."""
    from lora_compress.calibrate.loss import model_loss
    from lora_compress.core.targets import find_targets

    targets = find_targets(model)
    hooks = StatisticsHooks(targets, collectors_for(targets, (collector,)))
    embeddings = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    generator = torch.Generator().manual_seed(0)
    try:
        for ids in tiny_tokens().split(4):
            model_loss(model(input_ids=ids), ids, generator).backward()
            hooks.new_batch(ids.numel())
    finally:
        hooks.remove()
        embeddings.remove()
    return {name: stats["fisher"] for name, stats in hooks.statistics().items()}


def test_statistics_keep_the_full_gradient_covariance_up_to_the_width_limit():
    full = _gradient_statistics(build_llama(None, vocab=64), GradientCovariance())
    mixed = _gradient_statistics(build_llama(None, vocab=64),
                                 GradientCovariance(full_max=40))  # narrower than the MLP's hidden layer
    for name, covariance in full.items():
        out = covariance.shape[0]
        assert covariance.shape == (out, out) and torch.allclose(covariance, covariance.T)
        expected = (out, out) if out <= 40 else (out,)
        assert mixed[name].shape == expected
        diagonal = mixed[name].diagonal() if out <= 40 else mixed[name]
        assert torch.allclose(covariance.diagonal().double(), diagonal.double(), rtol=1e-4)
    assert {f.dim() for f in mixed.values()} == {1, 2}


@pytest.mark.parametrize("samples, lowest, highest", [(5, 0.5, 1.0), (20_000, 0.0, 0.05)])
def test_gradient_covariance_shrinks_towards_its_diagonal_more_when_samples_are_few(samples, lowest, highest):
    gradients = correlated_inputs(tokens=samples, features=30, seed=3)  # (N, out), strongly correlated
    total = gradients.T @ gradients
    fourth = torch.stack([gradients.pow(2).sum(1).pow(2).sum(), gradients.pow(4).sum()])
    shrunk = shrunk_covariance(total, fourth, samples)
    off = ~torch.eye(30, dtype=torch.bool)
    alpha = 1 - float(shrunk[off].norm() / total[off].norm())
    assert lowest <= alpha <= highest
    assert torch.equal(shrunk.diagonal(), total.diagonal())


def test_rank_deficient_gram_takes_the_ridge_path(layer):
    W, _ = layer
    X = correlated_inputs(tokens=8)  # 8 tokens, 24 features: XᵀX has rank 8
    gram = X.T @ X
    assert torch.linalg.cholesky_ex(gram)[1] != 0 or torch.linalg.matrix_rank(gram) < gram.shape[0]
    _, ridge = cholesky_factor(gram)
    factors = Whitening(W, gram).factors(4)
    assert ridge > 0
    assert torch.isfinite(factors.B).all() and torch.isfinite(factors.A).all()
    assert output_error(factors, W, X) < output_error(factorize(W, 4, compute_dtype=torch.float64), W, X)


@pytest.mark.parametrize("rank", [4, 10])
def test_shrunk_input_whitening_holds_up_on_inputs_correlated_otherwise(layer, rank):
    W, _ = layer
    g = torch.Generator().manual_seed(3)
    seen = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 24, generator=g, dtype=torch.float64)
    seen = seen + 1e-2 * torch.randn(400, 24, generator=g, dtype=torch.float64)  # calibration: 8 correlated directions
    other = torch.randn(400, 24, generator=g, dtype=torch.float64) * seen.std(0)  # same channel scales, uncorrelated
    shrunk = Whitening(W, seen.T @ seen, shrinkage=0.3).factors(rank)
    exact = Whitening(W, seen.T @ seen).factors(rank)
    assert output_error(shrunk, W, other) < 0.97 * output_error(exact, W, other)
    assert output_error(exact, W, seen) < output_error(shrunk, W, seen)  # the exact fit wins on its own text


def test_shrinking_the_gram_keeps_each_channel_scale(layer):
    from lora_compress.core.whitening import shrunk_gram

    _, X = layer
    shrunk = shrunk_gram(X.T @ X, 0.3)
    assert torch.allclose(shrunk.diagonal(), (X.T @ X).diagonal())
    assert torch.allclose(shrunk - torch.diag(shrunk.diagonal()), 0.7 * (X.T @ X - torch.diag((X.T @ X).diagonal())))


def test_the_output_route_shrinks_as_the_input_route_does(layer):
    W, X = layer
    W = W[:10]  # out ≤ in: the output route
    gram = X.T @ X
    from_inputs = Whitening(W, gram, shrinkage=0.3).factors(5)
    from_outputs = Whitening(W, output_gram=W @ gram @ W.T, shrinkage=0.3, input_diagonal=gram.diagonal()).factors(5)
    torch.testing.assert_close(from_outputs.B @ from_outputs.A, from_inputs.B @ from_inputs.A, rtol=1e-8, atol=1e-10)


def test_causal_calibration_loss_draws_its_labels_from_the_model():
    from lora_compress.calibrate.loss import model_loss

    logits = torch.full((2, 5, 8), -30.0)
    logits[..., 3] = 30.0  # the model is sure of token 3 everywhere
    ids = torch.zeros(2, 5, dtype=torch.long)  # the text says token 0
    loss = model_loss(type("Output", (), {"logits": logits})(), ids, torch.Generator().manual_seed(0))
    assert float(loss) < 1e-6


@pytest.mark.parametrize("rank", [3, 8])
def test_closed_loop_refit_never_increases_the_error_it_minimises(layer, rank):
    W, X_d = layer
    drift = correlated_inputs(seed=5) * 0.3
    X_c = X_d + drift  # what a compressed model feeds this layer
    refit = Whitening(W, X_c.T @ X_c, cross=X_d.T @ X_c, ridge=0.0).factors(rank)  # the exact least-squares refit
    open_loop = Whitening(W, X_c.T @ X_c).factors(rank)
    assert output_error(refit, W, X_c, X_d) < output_error(open_loop, W, X_c, X_d)


def random_costs(seed=0) -> dict[str, LayerCost]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(32, 32), (64, 32), (32, 64), (48, 16)] * 3
    return {f"layer{i}": LayerCost.from_spectrum(s, torch.rand(min(s), generator=g).pow(3) * 10 ** (i % 4))
            for i, s in enumerate(shapes)}


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8, 1.0])
def test_budget_is_met_within_one_rank_step(budget):
    costs = random_costs()
    ranks = allocate(costs, budget)
    dense = sum(c.dense_params for c in costs.values())
    total = sum(costs[n].params(r) for n, r in ranks.items())
    assert total <= budget * dense
    assert budget * dense - total < max(sum(c.shape) for c in costs.values())


def test_budget_spends_more_on_costly_layers():
    cheap = LayerCost.from_spectrum((32, 32), torch.linspace(1, 0.01, 32))
    costly = LayerCost.from_spectrum((32, 32), 1000 * torch.linspace(1, 0.01, 32))
    ranks = allocate({"cheap": cheap, "costly": costly}, 0.5)
    assert (ranks["costly"] or 32) > (ranks["cheap"] or 32)


def test_budget_below_rank_one_everywhere_names_the_smallest_feasible():
    costs = random_costs()
    with pytest.raises(LoraCompressError, match=r"smallest feasible budget is 0\.0[0-9]+"):
        allocate(costs, 0.001)


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2])
def test_budget_outside_unit_interval_is_refused(budget):
    with pytest.raises(LoraCompressError, match="outside"):
        CompressConfig(budget=budget, method="sequential")


def test_budget_with_plain_svd_is_refused():
    with pytest.raises(LoraCompressError, match="^budget needs calibration"):
        resolve(CompressConfig(budget=0.5, method="svd"), RunConfig(calib="text.txt"))


class WordTokenizer:
    def __call__(self, text, **kwargs):
        return {"input_ids": torch.arange(len(text.split())).unsqueeze(0)}


def test_too_short_calibration_text_says_how_many_tokens():
    with pytest.raises(LoraCompressError, match=r"has 5 tokens but .* needs 8"):
        calibration_tokens(WordTokenizer(), "one two three four five", 2, 4)


def test_calibration_samples_are_spread_over_the_text():
    tokens = calibration_tokens(WordTokenizer(), " ".join(["w"] * 100), 4, 10)
    assert tokens.shape == (4, 10)
    assert tokens[0, 0] == 0 and tokens[-1, -1] == 99


def tiny_tokens(samples=8, length=24) -> torch.Tensor:
    return torch.randint(2, 60, (samples, length), generator=torch.Generator().manual_seed(0))


def test_layers_that_read_one_input_form_a_group():
    from lora_compress.core.targets import find_targets

    model = build_llama(None, vocab=64)
    hooks = StatisticsHooks(find_targets(model), {})
    with torch.no_grad():
        model(input_ids=tiny_tokens(1, 8))
    hooks.remove()
    groups = hooks.groups()
    short = [[n.split(".")[-1] for n in group] for group in groups[:4]]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert len(groups) == 8


@pytest.mark.parametrize("build", [build_llama, build_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("method", ["whiten", "sequential", "sequential-refit"])
def test_calibrated_methods_meet_the_budget_and_beat_plain_svd(build, method):
    ids = tiny_tokens(2, 24)
    dense = build(None, vocab=64)
    reference = _output(dense, ids)
    errors = {}
    for name in ("svd", method):
        model = build(None, vocab=64)
        config = CompressConfig(ratio=0.5, method=name)
        compress_(model, config, progress=False, tokens=tiny_tokens() if name != "svd" else None)
        errors[name] = float((_output(model, ids) - reference).norm() / reference.norm())
    assert errors[method] < errors["svd"]
    model = build(None, vocab=64)
    report = compress_(model, CompressConfig(budget=0.6, method=method), progress=False, tokens=tiny_tokens())
    steps = max(sum(layer.shape) for layer in report.layers)
    assert 0.6 * report.dense_params - steps < report.params <= 0.6 * report.dense_params
    assert report.calibration["tokens"] == 8 * 24


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_method_without_tokens_asks_for_calibration_text_when_written_text_is_off():
    with pytest.raises(LoraCompressError, match="^method whiten needs calibration text; pass calib FILE"):
        compress_(build_llama(None, vocab=64), CompressConfig(ratio=0.5, method="whiten"),
                  RunConfig(calib_generated=0), progress=False)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    from conftest import TEXT
    path.write_text(TEXT * 4)
    return path


def test_cli_budget_writes_ranks_and_calibration_and_reloads(tiny_models, calib_file, tmp_path):
    out = tmp_path / "out"
    result = run("compress", str(tiny_models["llama"]), "--budget", "0.6", "--calib",
                 str(calib_file), "--calib-samples", "4", "--calib-len", "16",
                 "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "lora_compress.json").read_text())
    assert manifest["method"] == "sequential"
    assert manifest["calibration"]["tokens"] == 64 and manifest["calibration"]["sensitivity"]
    ranks = [layer["rank"] for layer in manifest["layers"].values()]
    assert len(set(ranks)) > 1
    model = load(out)
    assert {n: m.rank for n, m in model.named_modules() if hasattr(m, "lora_A")} == \
        {n: r for n, r in zip(manifest["layers"], ranks) if r is not None}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"too short", "needs"),
])
def test_cli_bad_calibration_file_exits_2_without_output(tiny_models, tmp_path, content, message):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    result = run("compress", str(tiny_models["llama"]), "--budget", "0.6", "--calib",
                 str(path), "--out", str(out), "--quiet")
    assert result.exit_code == 2
    assert message in result.output and "error:" in result.output
    assert not out.exists()


def test_cli_calib_with_plain_svd_warns_it_is_unused(tiny_models, calib_file, tmp_path):
    result = run("compress", str(tiny_models["llama"]), "--ratio", "0.5", "--method", "svd",
                 "--calib", str(calib_file), "--out", str(tmp_path / "o"), "--quiet")
    assert result.exit_code == 0, result.output
    assert "warning: --calib is unused" in result.output


def test_cli_budget_too_small_names_smallest_feasible(tiny_models, calib_file, tmp_path):
    result = run("compress", str(tiny_models["llama"]), "--budget", "0.01", "--calib",
                 str(calib_file), "--calib-samples", "4", "--calib-len", "16",
                 "--out", str(tmp_path / "o"), "--quiet")
    assert result.exit_code == 2
    assert "smallest feasible budget" in result.output


def test_calibration_longer_than_the_model_positions_is_refused():
    model = build_bert(None, vocab=64)  # 256 positions
    with pytest.raises(LoraCompressError, match="^calib_len 300 is longer"):
        compress_(model, CompressConfig(ratio=0.5, method="whiten"), progress=False, tokens=tiny_tokens(2, 300))


@pytest.mark.real
def test_minilm_budget_keeps_embeddings_close(minilm_dir, real_text_dir):
    from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
    from lora_compress.evaluation.metrics import mean_pool
    from lora_compress.storage.text import paragraphs, read_text

    source = resolve_source(str(minilm_dir))
    tokenizer = load_tokenizer(source)
    tokens = calibration_tokens(tokenizer, read_text(real_text_dir / "asyoulik.txt"), 8, 128)
    batch = tokenizer(paragraphs(read_text(real_text_dir / "alice29.txt"))[:32], padding=True, truncation=True,
                      max_length=128, return_tensors="pt")
    embeddings = {}
    for method in ("svd", "sequential"):
        model = load_dense(source)
        option = {"ratio": 0.8} if method == "svd" else {"budget": 0.8}
        report = compress_(model, CompressConfig(method=method, **option), progress=False,
                           tokens=tokens if method != "svd" else None)
        assert report.params <= 0.8 * report.dense_params
        with torch.no_grad():
            embeddings[method] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    with torch.no_grad():
        reference = mean_pool(load_dense(source)(**batch).last_hidden_state, batch["attention_mask"])
    cosine = {m: float((e * reference).sum(-1).mean()) for m, e in embeddings.items()}
    assert cosine["sequential"] > 0.8 and cosine["sequential"] > cosine["svd"]


@pytest.mark.parametrize("max_keep", [0.5, 0.75])
def test_budget_allocation_obeys_the_speed_rule(max_keep):
    costs = random_costs()
    ranks = allocate(costs, 0.7, max_keep)
    for name, rank in ranks.items():
        m, n = costs[name].shape
        assert rank is None or rank * (m + n) <= max_keep * m * n
    dense = sum(c.dense_params for c in costs.values())
    assert sum(costs[n].params(r) for n, r in ranks.items()) <= 0.7 * dense
