"""Jobs on a saved quantized model: ``lowbit eval`` (perplexity, and KL / top-1 against a reference) and
``lowbit generate`` (streamed text, with the tokenizer's chat template when it has one).

The model is :func:`lowbit.load`'s: real low-bit kernels, or the fake-quant simulation with ``simulate=True``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .artifact import load, load_tokenizer, read_manifest
from .data import DataConfig, check_source, prepare_data
from .evaluate import evaluate
from .models.loading import check_context, load_model
from .surgery.kvcache import decode_cache
from .surgery.prefix import cache_argument
from .version import __version__


def evaluate_saved(folder: str | Path, data: DataConfig | None = None, reference: str | None = "saved",
                   simulate: bool = False, progress=None, packed: bool = False) -> dict:
    """Perplexity of the saved model on ``data.eval`` windows, in ``lowbit quantize``'s report format.

    ``reference``: the full-precision model to compare against (KL, top-1 agreement, ppl ratio): ``"saved"`` (the
    default) is the source recorded at save time; ``None`` evaluates the quantized model alone. ``packed``: as
    :func:`lowbit.load`.
    """
    folder, data = Path(folder).expanduser(), data or DataConfig()
    check_source(data.eval)
    manifest = read_manifest(folder)
    source = manifest.get("source") if reference == "saved" else reference
    seconds, start = {}, time.perf_counter()
    model, tokenizer = load(folder, simulate=simulate, lean=True, packed=packed), load_tokenizer(folder)
    seconds["load"] = time.perf_counter() - start
    fp = load_model(source).model if source else model
    tokens = prepare_data(DataConfig(calib=data.eval, eval=data.eval, seq_len=data.seq_len, windows=data.windows,
                                     seed=data.seed), tokenizer)
    check_context(model.config, data.seq_len)
    start = time.perf_counter()
    result = evaluate(fp, model, tokens.eval_windows, progress=progress)
    seconds["eval"] = time.perf_counter() - start
    compared = fp is not model
    return {
        "lowbit_version": __version__, "model": str(folder), "recipe": (manifest["recipe"] or {}).get("name"),
        "simulate": simulate, "reference": source,
        "eval": {"data": data.eval, "seq_len": data.seq_len, "windows": int(tokens.eval_windows.shape[0]),
                 "tokens": result.tokens, "seed": data.seed},
        "fp": {"ppl": result.fp_ppl if compared else None},
        "quantized": {"ppl": result.ppl, "ppl_ratio": result.ppl / result.fp_ppl if compared else None,
                      "kl_vs_fp": result.kl_vs_fp if compared else None,
                      "top1_agreement": result.top1_agreement if compared else None},
        "bits": manifest.get("bits"),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "data_config": asdict(data),
    }


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 128, chat: bool = True,
             temperature: float = 0.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
    """Continue ``prompt`` (greedy at temperature 0, else sampled with ``seed``); ``on_text`` receives the text as
    it is produced. Returns the new text."""
    from transformers.generation.streamers import BaseStreamer

    class _Stream(BaseStreamer):
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.shown = ""
            self.skip = True  # the first put() is the prompt

        def put(self, value) -> None:
            if self.skip:
                self.skip = False
                return
            self.ids += value.flatten().tolist()
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if on_text and len(text) > len(self.shown) and not text.endswith("\ufffd"):
                on_text(text[len(self.shown):])
                self.shown = text

        def end(self) -> None:
            pass

    ids = _prompt_ids(tokenizer, prompt, chat)
    torch.manual_seed(seed)
    stream = _Stream()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache = {cache_argument(type(model).forward): decode_cache(model)}
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=stream,
                   pad_token_id=pad, **cache, **sampling)
    text = tokenizer.decode(stream.ids, skip_special_tokens=True)
    if on_text and len(text) > len(stream.shown):
        on_text(text[len(stream.shown):])
    return text
