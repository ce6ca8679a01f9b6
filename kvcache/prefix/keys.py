"""The prefix keys: which 32-byte key names each block of a prompt.

Owns: the key specification (docs/format.md, "Prefix keys") and turning the
token ids callers pass (lists, numpy arrays, torch tensors) into little-endian
uint32, or refusing them.  Keys depend only on their inputs (``hashlib``'s
SHA-256; never ``hash()`` or pickle), so every process and host computes the
same ones.
Must not touch: records, tiers, caches.
"""
from __future__ import annotations

import hashlib
import numbers
import operator
import sys
from typing import List

import numpy as np

from kvcache._codec import DTYPES

_MAGIC = b"kvcache-prefix-v1\0"
TOKEN_LIMIT = 2**32  # token ids are uint32


def token_ids(tokens, name: str = "tokens") -> np.ndarray:
    """``tokens`` as a 1-D little-endian uint32 array, or TypeError / ValueError.

    Accepted: a list or tuple of ints, a numpy integer array, or a torch
    integer tensor, of shape ``[T]`` or ``[1, T]``; every id in ``[0, 2**32)``.
    """
    if isinstance(tokens, (list, tuple)):
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, (numbers.Integral, np.integer)):
                raise TypeError(f"{name}: expected int token ids, got {type(t).__name__} "
                                f"{t!r} at index {i}")
        ids = [operator.index(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < TOKEN_LIMIT]
        if bad:
            raise ValueError(f"{name}: expected token ids in [0, 2**32), got {bad[0]}")
        return np.array(ids, dtype="<u4")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor of token ids, got {tokens.dtype}")
        try:
            tokens = tokens.detach().cpu().numpy()
        except (RuntimeError, NotImplementedError) as exc:  # a meta tensor has no data to read
            raise TypeError(f"{name}: expected a tensor of token ids it can copy to the CPU, got "
                            f"one on {tokens.device} ({exc})") from None
    elif not isinstance(tokens, np.ndarray):
        raise TypeError(f"{name}: expected token ids as a list of ints, a numpy integer array or a "
                        f"torch tensor, got {type(tokens).__name__}")
    if tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array of token ids, got dtype {tokens.dtype}")
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    elif tokens.ndim != 1:
        raise ValueError(f"{name}: expected shape [T] or [1, T] (batch size 1), "
                         f"got {list(tokens.shape)}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= TOKEN_LIMIT:
            raise ValueError(f"{name}: expected token ids in [0, 2**32), got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(tokens, dtype="<u4")


def _label(where: str, name: str) -> str:
    """How a message names an argument: ``prefix_hashes: n_layers`` or ``PrefixStore.n_layers:``."""
    return f"{where}: {name}" if where == "prefix_hashes" else f"{where}.{name}:"


def _shape_arg(name: str, value, where: str = "prefix_hashes") -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{_label(where, name)} expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{_label(where, name)} expected an int >= 1, got {value}")
    return int(value)


def root_key(*, model: str, n_layers: int, n_kv_heads: int, head_dim: int, block_tokens: int,
             dtype: str, salt: bytes = b"", where: str = "prefix_hashes") -> bytes:
    """The chain's root: the parent of block 0 (docs/format.md, "Prefix keys").
    ``where`` names the caller in messages (``PrefixStore``: ``PrefixStore.n_layers: ...``)."""
    if not isinstance(model, str):
        raise TypeError(f"{_label(where, 'model')} expected a str, got {type(model).__name__}")
    if not model:
        raise ValueError(f"{_label(where, 'model')} expected a non-empty name of the weights, got ''")
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise TypeError(f"{_label(where, 'salt')} expected bytes, got {type(salt).__name__}")
    if not isinstance(dtype, str):
        raise TypeError(f"{_label(where, 'dtype')} expected a str, got {type(dtype).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"{_label(where, 'dtype')} expected one of {tuple(DTYPES)}, got {dtype!r}")
    shape = "x".join(str(_shape_arg(n, v, where)) for n, v in
                     (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)))
    B = _shape_arg("block_tokens", block_tokens, where)
    return hashlib.sha256(_MAGIC + model.encode("utf-8") + b"\0" + hashlib.sha256(bytes(salt)).digest()
                          + f"{shape}:{B}:{dtype}".encode()).digest()


def chain(root: bytes, ids: np.ndarray, block_tokens: int, limit: int = -1) -> List[bytes]:
    """Keys of the full blocks of ``ids`` (uint32), the first ``limit`` only if >= 0."""
    n = len(ids) // block_tokens
    if limit >= 0:
        n = min(n, limit)
    raw = ids[:n * block_tokens].tobytes()
    step = 4 * block_tokens
    keys, parent, sha = [], root, hashlib.sha256
    for i in range(n):
        parent = sha(parent + raw[i * step:(i + 1) * step]).digest()
        keys.append(parent)
    return keys


def prefix_hashes(tokens, *, model: str, n_layers: int, n_kv_heads: int, head_dim: int,
                  block_tokens: int, dtype: str, salt: bytes = b"") -> List[bytes]:
    """One 32-byte key per full block of ``tokens``, the same in every process.

    ``root = SHA-256(b"kvcache-prefix-v1\\0" + model.encode("utf-8") + b"\\0" +
    SHA-256(salt) + f"{n_layers}x{n_kv_heads}x{head_dim}:{block_tokens}:{dtype}".encode())``
    and ``key[i] = SHA-256((root if i == 0 else key[i-1]) + tokens[i*B:(i+1)*B]``
    as little-endian uint32).  docs/format.md gives test vectors.

    Parameters
    ----------
    tokens : list of int, numpy integer array or torch tensor
        Token ids in ``[0, 2**32)``, shape ``[T]`` or ``[1, T]``.
    model : str
        Names the weights (e.g. ``"org/name@revision"``): KV of other weights
        never matches.
    n_layers, n_kv_heads, head_dim, block_tokens : int
    dtype : str
        The cache's storage dtype (``"float32"``, ``"float16"``, ...).
    salt : bytes
        Separates deployments (or tenants) that must not share records.

    Returns
    -------
    list of bytes
        ``len(tokens) // block_tokens`` keys; a partial last block has none.

    Raises
    ------
    TypeError
        Token ids that are not ints (floats, bools, strings...), or a field of
        the wrong type.
    ValueError
        Token ids outside ``[0, 2**32)``, a batch of more than one row, an
        unknown dtype, a field below 1.
    """
    root = root_key(model=model, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim,
                    block_tokens=block_tokens, dtype=dtype, salt=salt)
    return chain(root, token_ids(tokens), int(block_tokens))
