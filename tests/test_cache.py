"""`sts.cache`: entries are named by their key, verified by a sidecar sha256, never trusted blind."""

from __future__ import annotations

from sts.cache import Cache, fingerprint, key_digest


def test_json_entries_are_reused_verified_and_recomputed_when_corrupted(tmp_path, capsys):
    cache = Cache(tmp_path)
    calls: list[int] = []

    def compute() -> dict[int, str]:
        calls.append(1)
        return {3: "three", 1: "one"}

    key = {"kind": "generated", "examples": "abc"}
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"}
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"} and len(calls) == 1
    assert cache.get_or_compute_json(key | {"examples": "abd"}, compute) and len(calls) == 2  # another key
    entry = tmp_path / "extract" / f"{key_digest(key)}.json"
    entry.write_text(entry.read_text().replace("three", "tree"))  # same length, other bytes
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"} and len(calls) == 3
    assert "corrupted" in capsys.readouterr().err
    (tmp_path / "extract" / f"{key_digest(key)}.sha256").unlink()  # a payload without its sidecar
    cache.get_or_compute_json(key, compute)
    assert len(calls) == 4


def test_a_disabled_cache_computes_and_stores_nothing(tmp_path):
    cache = Cache(tmp_path, enabled=False)
    assert cache.get_or_compute_json({"k": 1}, lambda: {1: "x"}) == {1: "x"}
    assert not (tmp_path / "extract").exists()


def test_fingerprint_follows_file_contents(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = fingerprint(str(model))
    assert fingerprint(str(model)) == first and fingerprint("hub/id") != first
    (model / "config.json").write_text('{"x": 1}')
    assert fingerprint(str(model)) != first and fingerprint("") == ""


def test_shipped_entries_are_read_when_verified_and_never_written(tmp_path):
    shipped = tmp_path / "shipped"
    Cache(tmp_path / "maker", shipped=None).get_or_compute_json({"kind": "x"}, lambda: {1: "shipped"})
    (tmp_path / "maker" / "extract").rename(shipped)
    calls: list[int] = []

    def compute() -> dict[int, str]:
        calls.append(1)
        return {1: "computed"}

    user = Cache(tmp_path / "user", shipped=shipped)
    assert user.has({"kind": "x"}, ".json") and not user.has({"kind": "y"}, ".json")
    assert user.get_or_compute_json({"kind": "x"}, compute) == {1: "shipped"} and not calls
    assert user.hits == ["shipped"] and not (tmp_path / "user" / "extract").exists()
    payload = next(shipped.glob("*.json"))
    payload.write_text(payload.read_text().replace("shipped", "shipper"))  # altered: not trusted
    assert user.get_or_compute_json({"kind": "x"}, compute) == {1: "computed"} and calls == [1]


def test_the_embedded_model_and_sae_have_one_identity_wherever_they_sit(tmp_path, monkeypatch):
    from sts.data.embedded import GGUF, SAE_DIR
    from sts.prediction.session import identity

    monkeypatch.setenv("STS_CACHE", str(tmp_path / "a"))
    model_a = identity(str(tmp_path / "a" / "smollm2-135m-instruct"))
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "b"))
    assert identity(str(tmp_path / "b" / "smollm2-135m-instruct")) == model_a == f"embedded-model:{GGUF[2]}"
    assert identity(str(SAE_DIR)) == identity(str(SAE_DIR / ".." / SAE_DIR.name)) != str(SAE_DIR)
    assert identity(str(SAE_DIR)).startswith("embedded-sae:")
    assert identity(str(tmp_path)) == fingerprint(str(tmp_path))  # anything else: by its files


def test_the_shipped_domain_statistics_are_the_embedded_defaults():
    """`sts predict`'s defaults find the demo's training side and every domain's statistics
    among the shipped entries: a change to the questions, the rendering, the code version or the
    embedded files makes this fail until `scripts/ship_domain_stats.py` is rerun."""
    from sts.cache import SHIPPED
    from sts.data.datasets import training_and_domains
    from sts.data.embedded import default_sae_dir
    from sts.engine.models import default_model_dir
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import explained, gradient_train
    from sts.prediction.session import Session, domain_key, gradient_domain_key, gradient_train_key, shift_key

    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()))
    train, domains = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    session = Session(cfg, lambda _m: None)
    # the demo's own training side: its sketched gradients and the SAE shift that explains them
    for what, key in [("gradients", gradient_train_key(session, cfg, gradient_train(cfg, train), cfg.gradient_sketch)),
                      ("SAE shift", shift_key(session, cfg, explained(cfg, train)) | {"readout": "sae"})]:
        assert (SHIPPED / f"{key_digest(key)}.safetensors").is_file(), f"no shipped {what} of {cfg.train}"
    # every embedded domain set: the default (reference chains of thought, sealed) and MMLU's questions
    _, mmlu = training_and_domains(cfg.train, "embedded:mmlu", cfg.max_train, cfg.max_examples)
    for name, exs in [*domains.items(), *mmlu.items()]:
        digest = key_digest(domain_key(session, cfg, exs) | {"readout": "sae"})
        assert (SHIPPED / f"{digest}.safetensors").is_file(), f"no shipped statistics for {name}"
        # the default score's (grad) domain side, sketched as it is by default
        digest = key_digest(gradient_domain_key(session, cfg, name, exs, cfg.gradient_sketch))
        assert (SHIPPED / f"{digest}.safetensors").is_file(), f"no shipped gradient side for {name}"
    assert len(domains) == 14 and cfg.domains == "embedded:mmlu-pro-cot"
