"""SecAgg+-style secure aggregation (Bonawitz et al. 2017; Bell et al. 2020): the protocol's two roles as
pure state machines, no I/O. :mod:`fedbus.aggregator.secure_round` moves their messages over the bus.

Stages of one round (client *i*, neighbours *N(i)*, threshold *t*)::

    1 advertise   i → server : X25519 public keys (pk_enc, pk_mask) and its example count
    2 roster      server → all: every advertised key; the total example count W
    3 share       i → server : for each j ∈ N(i), Enc_{k_ij}(j's Shamir shares of b_i and sk_mask_i)
                  server → j : the ciphertexts addressed to j (the server cannot read them)
    4 mask        i → server : y_i = q(x_i·n_i/W) + PRG(b_i) + Σ_{j∈N(i)} ±PRG(s_ij)   (mod 2³²)
    5 unmask      server → all: survivors U (sent y) and dropped D (advertised, never sent y)
                  j → server : shares of b_i for i ∈ U, shares of sk_mask_i for i ∈ D  (never both for one i)
                  server     : Σ y − Σ_{i∈U} PRG(b_i) ∓ PRG(s_ij) for dropped neighbours = Σ_{i∈U} q_i

``s_ij`` is HKDF(X25519(sk_mask_i, pk_mask_j)), equal on both sides, so pairwise masks cancel in the sum; the
self mask ``b_i`` hides ``y_i`` even when the server learns ``s_ij`` of a dropped peer. Clients that drop
after sending ``y_i`` are recovered from their ``b_i`` shares, clients that drop before are unmasked from
their ``sk_mask`` shares, as long as ``t`` holders answer. The server only ever holds the running sum of
masked vectors (:attr:`SecAggServer.masked_sum`), never one client's vector. Threat model: an honest-but-
curious server (no consistency-check round); a client refuses an unmask request that names one peer both
as survivor and as dropped, the one request that would unmask an individual.

Quantisation (as Flower's SecAgg+): clip to ``[−clip, clip]``, map linearly to ``[0, levels − 1]``; the
sum of ``k`` clients needs ``k·(levels − 1) < 2³²``. PRGs are ChaCha20 key streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import shamir
from .errors import SecAggError

__all__ = [
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "dequantize",
    "neighbours",
    "prg",
    "quantize",
]

U32 = npt.NDArray[np.uint32]
F32 = npt.NDArray[np.float32]
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggParams:
    """Protocol parameters, announced by the server with the round."""

    threshold: int = 2
    """Shares needed to reconstruct a secret: the most dropouts tolerated is ``neighbours − threshold``."""
    neighbours: int = 0
    """SecAgg+ graph degree (each client masks with and shares to this many peers, rounded down to even);
    0 = all peers."""
    clip: float = 8.0
    levels: int = 1 << 22

    def check(self, clients: int) -> None:
        if self.threshold < 1:
            raise SecAggError(f"threshold must be >= 1, got {self.threshold}")
        degree = self.degree(clients)
        if self.threshold > degree:
            raise SecAggError(f"threshold {self.threshold} exceeds the {degree} share holders per client")
        if clients * (self.levels - 1) >= 1 << 32:
            raise SecAggError(f"{clients} clients × {self.levels} levels overflow the 2^32 modulus")

    def degree(self, clients: int) -> int:
        """Peers per client: all others, or ``neighbours`` rounded down to even (a ring graph is symmetric
        only with as many peers on each side)."""
        if self.neighbours <= 0 or self.neighbours >= clients - 1:
            return clients - 1
        return max(2, self.neighbours - self.neighbours % 2)


def quantize(x: F32, *, clip: float, levels: int) -> U32:
    """Clip to ``[−clip, clip]`` and round to ``levels`` evenly spaced integers ``0 … levels − 1``."""
    scaled = (np.clip(x, -clip, clip).astype(np.float64) + clip) * ((levels - 1) / (2 * clip))
    return np.rint(scaled).astype(np.uint32)


def dequantize(total: U32, *, count: int, clip: float, levels: int) -> F32:
    """The sum of ``count`` clients' values from the sum of their quantised vectors."""
    return (total.astype(np.float64) * (2 * clip / (levels - 1)) - count * clip).astype(np.float32)


def prg(seed: bytes, length: int, *, purpose: bytes) -> U32:
    """``length`` pseudo-random uint32 words: the ChaCha20 key stream of ``seed`` (32 bytes)."""
    nonce = (purpose + bytes(16))[:16]
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype=np.uint32)


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def neighbours(roster: list[str], client: str, degree: int) -> list[str]:
    """SecAgg+ graph: the ``degree`` peers nearest to ``client`` on the ring of the sorted roster."""
    ring = sorted(roster)
    n = len(ring)
    if degree >= n - 1:
        return [c for c in ring if c != client]
    i = ring.index(client)
    out: list[str] = []
    step = 1
    while len(out) < degree:
        for j in (i + step, i - step):
            peer = ring[j % n]
            if peer != client and peer not in out and len(out) < degree:
                out.append(peer)
        step += 1
    return sorted(out)


def _index(roster: list[str], client: str) -> int:
    return sorted(roster).index(client) + 1  # Shamir x coordinate, >= 1


@dataclass(frozen=True, slots=True)
class PublicKeys:
    enc: bytes
    mask: bytes
    num_examples: int


class SecAggClient:
    """One client's side of a secure round. Create a new one for every round (fresh keys and seeds)."""

    def __init__(self, client_id: str, params: SecAggParams, *, context: bytes) -> None:
        self.client_id = client_id
        self.params = params
        self.context = context  # run id and round: binds keys, shares and masks to this round
        self._enc = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self.roster: dict[str, PublicKeys] = {}
        self.total_examples = 0
        self.peers: list[str] = []
        self.held: dict[str, tuple[bytes, bytes]] = {}  # peer -> (share of b_peer, share of sk_mask_peer)

    # stage 1
    def advertise(self) -> tuple[bytes, bytes]:
        """This client's public keys (encryption, masking)."""
        return self._enc.public_key().public_bytes(*_RAW), self._mask.public_key().public_bytes(*_RAW)

    # stage 3
    def share(self, roster: dict[str, PublicKeys], *, total_examples: int) -> dict[str, bytes]:
        """Encrypted shares of this client's secrets, one ciphertext per neighbour."""
        if self.client_id not in roster:
            raise SecAggError(f"{self.client_id} is not in the roster", stage="share")
        self.params.check(len(roster))
        self.roster = dict(roster)
        self.total_examples = total_examples
        names = sorted(roster)
        self.peers = neighbours(names, self.client_id, self.params.degree(len(names)))
        holders = [_index(names, p) for p in self.peers]
        mask_raw = self._mask.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        b_shares = shamir.split(self._self_seed, holders=holders, threshold=self.params.threshold)
        k_shares = shamir.split(mask_raw, holders=holders, threshold=self.params.threshold)
        out = {}
        for peer, x in zip(self.peers, holders, strict=True):
            aead = ChaCha20Poly1305(self._channel_key(peer))
            nonce = os.urandom(12)
            out[peer] = nonce + aead.encrypt(nonce, b_shares[x] + k_shares[x], self._ad(self.client_id, peer))
        return out

    def _channel_key(self, peer: str) -> bytes:
        shared = self._enc.exchange(X25519PublicKey.from_public_bytes(self.roster[peer].enc))
        return _kdf(shared, b"fedbus-secagg-share|" + self.context)

    def _ad(self, src: str, dst: str) -> bytes:
        return b"|".join((self.context, src.encode(), dst.encode()))

    def receive(self, inbox: dict[str, bytes]) -> None:
        """Decrypt the shares other clients addressed to this one."""
        for src, blob in inbox.items():
            if src not in self.peers:
                raise SecAggError(
                    f"share from {src}, who is not a neighbour of {self.client_id}", stage="share"
                )
            try:
                plain = ChaCha20Poly1305(self._channel_key(src)).decrypt(
                    blob[:12], blob[12:], self._ad(src, self.client_id)
                )
            except InvalidTag:
                raise SecAggError(f"share from {src} does not decrypt", stage="share") from None
            n = shamir.SHARE_BYTES
            self.held[src] = (plain[:n], plain[n : 2 * n])
        # Mask only with neighbours that shared (the server delivers exactly their ciphertexts): a peer that
        # dropped before sharing could never be unmasked, so nobody may mask with it.
        self.peers = [p for p in self.peers if p in inbox]

    # stage 4
    def mask(self, x: F32, *, num_examples: int) -> U32:
        """The masked, quantised, example-weighted vector to send."""
        if not self.peers:
            raise SecAggError("mask() before share()", stage="mask")
        weighted = x * np.float32(num_examples / self.total_examples)
        y = quantize(weighted, clip=self.params.clip, levels=self.params.levels)
        y += prg(self._self_seed, y.size, purpose=b"self")
        for peer in self.peers:
            shared = self._mask.exchange(X25519PublicKey.from_public_bytes(self.roster[peer].mask))
            m = prg(_kdf(shared, b"fedbus-secagg-mask|" + self.context), y.size, purpose=b"pair")
            if self.client_id < peer:
                y += m
            else:
                y -= m
        return y

    # stage 5
    def reveal(self, survivors: list[str], dropped: list[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Shares of ``b`` for surviving neighbours and of ``sk_mask`` for dropped ones."""
        both = set(survivors) & set(dropped)
        if both:
            raise SecAggError(
                f"unmask request names {sorted(both)} as both survivor and dropped: refused", stage="unmask"
            )
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"only {len(survivors)} survivors, below the threshold", stage="unmask")
        seeds = {p: self.held[p][0] for p in survivors if p in self.held}
        keys = {p: self.held[p][1] for p in dropped if p in self.held}
        return seeds, keys


@dataclass
class SecAggServer:
    """The server's side of a secure round. It only ever holds the running sum of masked vectors."""

    params: SecAggParams
    context: bytes
    dim: int
    roster: dict[str, PublicKeys] = field(default_factory=dict)
    masked_sum: U32 | None = None
    shared: set[str] = field(default_factory=set)
    """Clients whose shares were routed (the only ones allowed to send masked input)."""
    survivors: list[str] = field(default_factory=list)
    _seed_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    _key_shares: dict[str, dict[int, bytes]] = field(default_factory=dict)
    revealers: set[str] = field(default_factory=set)

    def advertised(self, client: str, enc: bytes, mask: bytes, num_examples: int) -> None:
        """Stage 1: record a client's public keys."""
        if len(enc) != 32 or len(mask) != 32 or num_examples <= 0:
            raise SecAggError(f"bad advertisement from {client}", stage="advertise")
        self.roster[client] = PublicKeys(enc, mask, num_examples)

    def close_roster(self) -> int:
        """Freeze the roster (stage 2); returns the total example count."""
        if len(self.roster) < max(self.params.threshold + 1, 2):
            raise SecAggError(
                f"{len(self.roster)} clients advertised keys, need > threshold {self.params.threshold}",
                stage="roster",
            )
        self.params.check(len(self.roster))
        return sum(k.num_examples for k in self.roster.values())

    def route(self, src: str, ciphertexts: dict[str, bytes]) -> dict[str, bytes]:
        """Stage 3: check addressing of one client's ciphertexts (destinations must be its neighbours)."""
        expected = set(neighbours(sorted(self.roster), src, self.params.degree(len(self.roster))))
        if src not in self.roster or set(ciphertexts) != expected:
            raise SecAggError(f"{src} addressed shares to the wrong peers", stage="share")
        self.shared.add(src)
        return ciphertexts

    def add_masked(self, client: str, y: U32) -> None:
        """Stage 4: fold one masked vector into the sum (the vector itself is not kept)."""
        if client not in self.shared or client in self.survivors:
            raise SecAggError(f"unexpected masked input from {client}", stage="mask")
        if y.dtype != np.uint32 or y.shape != (self.dim,):
            raise SecAggError(f"masked input from {client} has shape {y.shape} {y.dtype}", stage="mask")
        if self.masked_sum is None:
            self.masked_sum = np.zeros(self.dim, np.uint32)
        self.masked_sum += y
        self.survivors.append(client)

    def dropped(self) -> list[str]:
        """Clients that shared their secrets but sent no masked input: their pairwise masks must go."""
        return sorted(self.shared - set(self.survivors))

    def add_reveal(self, client: str, seeds: dict[str, bytes], keys: dict[str, bytes]) -> None:
        """Stage 5: shares from one responding client."""
        if client not in self.roster or client in self.revealers:
            return
        if set(seeds) - set(self.survivors) or set(keys) - set(self.dropped()):
            raise SecAggError(f"{client} revealed shares for the wrong peers", stage="unmask")
        x = _index(list(self.roster), client)
        for peer, share in seeds.items():
            self._seed_shares.setdefault(peer, {})[x] = share
        for peer, share in keys.items():
            self._key_shares.setdefault(peer, {})[x] = share
        self.revealers.add(client)

    def can_unmask(self) -> bool:
        t = self.params.threshold
        return all(len(self._seed_shares.get(c, {})) >= t for c in self.survivors) and all(
            len(self._key_shares.get(c, {})) >= t for c in self.dropped() if self._has_surviving_peer(c)
        )

    def _peers(self, client: str) -> list[str]:
        """The neighbours ``client`` actually masked with: those that shared."""
        names = sorted(self.roster)
        return [p for p in neighbours(names, client, self.params.degree(len(names))) if p in self.shared]

    def _has_surviving_peer(self, client: str) -> bool:
        return any(p in self.survivors for p in self._peers(client))

    def unmask(self) -> tuple[F32, int]:
        """The example-weighted mean of the survivors' vectors, and how many survivors it covers."""
        if self.masked_sum is None or len(self.survivors) < self.params.threshold:
            raise SecAggError(f"{len(self.survivors)} masked inputs, below the threshold", stage="unmask")
        if not self.can_unmask():
            raise SecAggError("not enough shares revealed to unmask", stage="unmask")
        t = self.params.threshold
        total = self.masked_sum.copy()
        for client in self.survivors:
            seed = shamir.combine(self._seed_shares[client], threshold=t)
            total -= prg(seed, self.dim, purpose=b"self")
        for gone in self.dropped():
            if not self._has_surviving_peer(gone):
                continue
            sk = X25519PrivateKey.from_private_bytes(shamir.combine(self._key_shares[gone], threshold=t))
            for peer in self._peers(gone):
                if peer not in self.survivors:
                    continue
                shared = sk.exchange(X25519PublicKey.from_public_bytes(self.roster[peer].mask))
                m = prg(_kdf(shared, b"fedbus-secagg-mask|" + self.context), self.dim, purpose=b"pair")
                if peer < gone:  # the survivor added +m for a larger peer id, −m for a smaller one
                    total -= m
                else:
                    total += m
        k = len(self.survivors)
        weighted_sum = dequantize(total, count=k, clip=self.params.clip, levels=self.params.levels)
        covered = sum(self.roster[c].num_examples for c in self.survivors)
        total_examples = sum(p.num_examples for p in self.roster.values())
        return (weighted_sum * np.float32(total_examples / covered)).astype(np.float32), k
