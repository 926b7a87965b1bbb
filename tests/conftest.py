"""Tiny random models, tokenizers and SAEs, built on the spot (no network, no downloads)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Under pytest-xdist (`make test` runs two workers) the workers share the cores: each takes at most
# its share of them as torch threads, whatever OMP_NUM_THREADS allows (two workers of two threads
# each on two cores took twice as long: 443 s against 214 s).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(min(torch.get_num_threads(), share))
HIDDEN = 32
INTERMEDIATE = 64
N_LAYERS = 4

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Solve for x: 2x + 3 = 7, so x = 2.",
    "Photosynthesis turns light into chemical energy in plants.",
    "The derivative of x squared is two x.",
    "Courts interpret the law and settle disputes between parties.",
    "Atoms bond to form molecules; acids donate protons.",
    "What is the capital of France? Paris is the capital.",
    "Compute 12 times 12. The answer is 144.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder that one test worker fills and every worker reads: (the folder, whether this worker
    must fill it). pytest-xdist's recipe for a session fixture computed once per run (a file lock in
    the run's shared temporary folder): the workers' sessions are apart, and `--dist loadgroup`
    cannot keep a fixture's tests together under pytest 9, whose node ids xdist 3.8 cannot tag."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield tmp_path_factory.mktemp(name), True
        return
    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(str(root) + ".lock"):
        built = root / ".built"
        if built.exists():
            yield root, False
        else:
            root.mkdir(exist_ok=True)
            yield root, True
            built.touch()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    # BOS added by default, as Llama-family tokenizers do: exercises special-token handling.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(family: str, vocab: int):
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    elif family == "gemma2":
        cfg = Gemma2Config(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """family -> a save_pretrained directory holding a tiny random model and the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("llama", "mistral", "qwen2", "gemma2", "gpt2"):
        d = root / family
        make_model(family, len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


def make_sae(arch: str, d_in: int = HIDDEN, d_sae: int = 96, hook: str = "blocks.2.hook_resid_post",
             seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=meta))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        raise ValueError(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "threshold" else 0.2))
        if arch == "jumprelu":
            sae.threshold.abs_()
    return sae.eval()


@pytest.fixture(scope="session")
def sae_dirs(tmp_path_factory):
    """arch -> a sae_lens directory (SAE.save_model) for layer 2 of the tiny models."""
    root = tmp_path_factory.mktemp("saes")
    out = {}
    for arch in ("standard", "topk", "jumprelu"):
        make_sae(arch).save_model(root / arch)
        out[arch] = root / arch
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# five question-solution records (LIMO's fields): a training set
QA_RECORDS = [{"question": q, "solution": s, "answer": a} for q, s, a in [
    ("What is 2 + 3?", "Add the numbers: 2 + 3 = 5.", "5"),
    ("Solve 2x = 8.", "Divide both sides by 2, so x = 4.", "4"),
    ("What is 12 times 12?", "Compute 12 times 12. The answer is 144.", "144"),
    ("Derivative of x squared?", "The derivative of x squared is two x.", "2x"),
    ("What is 9 - 4?", "Subtract: 9 - 4 = 5.", "5"),
]]


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", QA_RECORDS)


QUESTIONS = {
    "math": ["What is 4 + 5?", "Solve 3x = 9.", "What is 11 times 11?"],
    "law": ["Courts interpret the law.", "Who settles disputes between parties?", "What is a contract?"],
    "biology": ["Photosynthesis turns light into what?", "What do plants need?", "Name a cell organelle."],
}


# five questions in each of three domains: the paper's scores and the domain demonstrations
DOMAINS = {
    "math": ["What is 2 + 3?", "Solve 2x = 8 for x.", "What is 12 times 12?", "Compute 9 - 4.",
             "Is 7 a prime number?"],
    "law": ["Courts interpret the law.", "Who settles disputes between parties?", "What is a contract?",
            "Define a tort.", "What does a judge do?"],
    "biology": ["Photosynthesis turns light into what?", "What do plants need?", "Name a cell organelle.",
                "What carries oxygen in blood?", "What is DNA made of?"],
}

needs_shared = pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data is absent")


# three domains of three multiple-choice questions each (MMLU-Pro fields)
DOMAIN_RECORDS = [{"question_id": i, "question": q, "options": ["yes", "no", "maybe"], "answer": "A",
                   "answer_index": 0, "category": cat, "src": "test"}
                  for i, (cat, q) in enumerate((c, q) for c, qs in QUESTIONS.items() for q in qs)]


@pytest.fixture
def domain_file(tmp_path):
    return write_jsonl(tmp_path / "domains.jsonl", DOMAIN_RECORDS)


@pytest.fixture
def text_file(tmp_path):
    return write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in CORPUS])


# --- the command line ------------------------------------------------------------------------

@dataclass
class CliResult:
    """What one `sts` run gave: `sts.cli.main`'s exit code and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """run_cli(argv, expect=0): runs `sts.cli.main(argv)` in process and returns a CliResult;
    fails the test (showing stderr) when the exit code is not `expect` (None: any code)."""
    from sts.cli import main

    def run(argv: list[str], expect: int | None = 0) -> CliResult:
        capsys.readouterr()  # what came before is not this run's output
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        result = CliResult(code, captured.out, captured.err)
        if expect is not None:
            assert code == expect, f"exit {code}, expected {expect}; stderr:\n{captured.err}"
        return result

    return run


def assert_bad_input(result: CliResult, *needles: str, out: Path | None = None) -> str:
    """The bad-input contract: exit status 2, one line on stderr (warnings aside) starting
    "sts: error: " and holding every needle, no traceback, and at `out` no output, not even a
    partial one (a hidden `.NAME*` temporary beside it). Returns the error line."""
    lines = [line for line in result.err.splitlines() if not line.startswith("sts: warning:")]
    assert result.code == 2, result.err
    assert len(lines) == 1 and lines[0].startswith("sts: error: "), result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "partial output left"
    return lines[0]


@pytest.fixture
def cli_fails(run_cli):
    """cli_fails(argv, *needles, out=None): runs `sts` and asserts the bad-input contract."""

    def fails(argv: list[str], *needles: str, out: Path | None = None) -> str:
        return assert_bad_input(run_cli(argv, expect=None), *needles, out=out)

    return fails


@pytest.fixture
def held_objects(model_dirs, sae_dirs):
    """What a notebook user holds: the tiny llama (transformers), its tokenizer and a TopK SAE (sae_lens)."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {"model": AutoModelForCausalLM.from_pretrained(model_dirs["llama"]),
            "tokenizer": AutoTokenizer.from_pretrained(model_dirs["llama"]),
            "sae": SAE.load_from_disk(sae_dirs["topk"])}
