"""Shared fixtures: tiny seeded random models of every supported family, a tiny tokenizer and text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("llama", "qwen2", "mistral", "qwen2-real")  # qwen2-real: Qwen2 with a real model's awkward sizes

SENTENCES = (
    "The committee met on Tuesday to discuss the new budget for the city schools. ",
    "Heavy rain is expected across the north of the country over the weekend. ",
    "Shares in the company rose sharply after it reported better than expected profits. ",
    "The minister said the talks had been useful but that more work was needed. ",
    "Police are searching for a man who escaped from a prison near the border. ",
    "Scientists have found evidence of water on a small moon of the planet. ",
)


def make_text(n_sentences: int, seed: int = 0) -> str:
    """Seeded pseudo-news text built from a few sentences."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(SENTENCES), (n_sentences,), generator=g).tolist()
    return "".join(SENTENCES[i] for i in idx)


def tiny_config(family: str, vocab_size: int = 320):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family == "qwen2-real":  # Qwen2.5-0.5B's quirks, scaled down in width only: 14 query / 2 KV heads, the
        # 4864-wide MLP (R4's Hadamard 4864 = 76 x 64), hidden 224 (R1's 224 = 28 x 8), untied lm_head
        return Qwen2Config(vocab_size=vocab_size, hidden_size=224, intermediate_size=4864, num_hidden_layers=2,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=family == "llama",
    )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return cls(**common)


def tiny_gemma3_config(vocab_size: int = 320):
    """A tiny Gemma 3: post-norms, q/k norms, GeGLU, scaled embeddings, a sliding-window layer (window 8) then a
    full-attention one, head_dim != hidden / heads, tied embeddings."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=64, tie_word_embeddings=True,
    )


def tiny_model(family: str, seed: int = 0, vocab_size: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_gemma3_config(vocab_size) if family == "gemma3" else tiny_config(family, vocab_size)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "gemma3":  # Gemma's norms start at weight 0 (scale 1, uniform): give them real, non-uniform scales
        for name, param in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(param, std=0.5)
    if family.startswith("qwen2"):  # give the q/k/v biases real values so dropping them would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    if family == "qwen2-real":  # and keys with the real model's shared offset: a k_proj bias far above the keys'
        for layer in model.model.layers:  # per-token variation (std 0.02 weights give keys of std ~0.3)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=8.0)
    return model


def tiny_data(seed: int = 3):
    """Random token windows and calibration tokens for the tiny models (vocab 320)."""
    from lowbit.data import TokenData

    g = torch.Generator().manual_seed(seed)
    return TokenData(eval_windows=torch.randint(0, 320, (2, 40), generator=g),
                     calib_tokens=torch.randint(0, 320, (4000,), generator=g), seed=0)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the fly (vocab 320), saved as a transformers tokenizer folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([make_text(200)], vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama saved as a Hugging Face folder with its tokenizer, loadable with --model PATH."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "news.txt"
    path.write_text(make_text(400, seed=3))
    return path


def recording_progress() -> tuple:
    """A ``progress(description, total) -> tick(status)`` callback and the list of (description, status) it records."""
    seen: list[tuple[str, str | None]] = []
    return (lambda description, total: lambda status=None: seen.append((description, status))), seen


def _gloo_worker(rank: int, world: int, init: str, out: str, job) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(job(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def on_gloo_processes(tmp_path: Path, job, world: int = 2) -> list:
    """``job()`` (a module-level function) run on ``world`` processes of one gloo group: each process's answer."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_gloo_worker, args=(world, f"file://{tmp_path / 'init'}", out, job), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}") for r in range(world)]
