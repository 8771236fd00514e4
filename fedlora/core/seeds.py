"""Every seed a run derives from its one ``seed``, in one place (standard library only).

Everything random in a run is drawn from a generator seeded by a pure function of the run seed
and of where the draw happens (round, client, module, row). Two runs with the same seed therefore
draw the same numbers in every process (server, Ray actors, deployed nodes) and on every machine,
whatever order the processes run in; a test can compute any of them in advance.

The formulas are frozen: changing one changes every result that depends on it, which the golden
runs (``tests/golden/``) would catch. Hashes are ``zlib.crc32`` and ``hashlib.blake2b`` (the same
everywhere), never Python's ``hash`` (salted per process).
"""

from __future__ import annotations

import hashlib
import random
import zlib


def client_training(seed: int, server_round: int, client_id: int) -> int:
    """Seed of one client's local training in one round: its batches and its dropout masks."""
    return seed * 1_000_003 + server_round * 1009 + client_id


def pooled_training(seed: int, server_round: int) -> int:
    """Seed of the centralized bound's training in one round (one learner on the pooled data)."""
    return seed * 1_000_003 + server_round


def sampling(seed: int, server_round: int) -> random.Random:
    """The generator that picks the clients of one round."""
    return random.Random(seed * 7919 + server_round)


def rank_tiers(seed: int) -> random.Random:
    """The generator of ``ranks.policy=random``: one tier drawn per client, in client order."""
    return random.Random(seed)


def fresh_adapter(seed: int, server_round: int, client_id: int) -> int:
    """A 62-bit seed for a fresh LoRA ``A`` (FLoRA's per-round re-initialisation).

    ``client_id = -1`` is the server's own fresh global adapter.
    """
    digest = hashlib.blake2b(f"flora/{seed}/{server_round}/{client_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def lora_a_row(seed: int, module: str, row: int) -> int:
    """A 63-bit seed for one row of an initial ``A``: the rows of rank ``r`` are the first ``r`` of any larger rank."""
    return (seed * 1_000_003 + zlib.crc32(module.encode()) * 10_007 + row) % (2**63 - 1)


def dp_stream(training_seed: int, stream: str) -> int:
    """A 62-bit seed for one of DP-SGD's random streams (``batches``, ``noise``) of one client round.

    Derived from the round's training seed by a hash, so the Poisson batches and the Gaussian noise
    are independent streams rather than two generators started at the same state.
    """
    digest = hashlib.blake2b(f"dp/{stream}/{training_seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def client_dp_noise(seed: int, server_round: int) -> int:
    """A 62-bit seed for the Gaussian noise of client-level DP's aggregate in one round."""
    digest = hashlib.blake2b(f"client-dp/{seed}/{server_round}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def faults(seed: int, server_round: int, client_id: int) -> random.Random:
    """The generator of one client's injected faults in one round (a string seed: SHA-512 in ``random``)."""
    return random.Random(f"fedlora-faults/{seed}/{server_round}/{client_id}")


def secure_ring(seed: int, server_round: int) -> random.Random:
    """Where a secure round places its clients on SecAgg+'s ring (who holds whose shares)."""
    return random.Random(f"fedlora-secagg-ring/{seed}/{server_round}")


def secure_quantization(seed: int, server_round: int, client_id: int) -> int:
    """The seed of a client's stochastic quantization in a secure round (NumPy's legacy 32-bit seed)."""
    digest = hashlib.blake2b(f"fedlora-secagg-quantization/{seed}/{server_round}/{client_id}".encode(),
                             digest_size=4).digest()
    return int.from_bytes(digest, "little")


def client_test_split(split_seed: int, client_id: int) -> random.Random:
    """Which of client ``client_id``'s examples it holds out to evaluate on (``data.client_test_fraction``)."""
    return random.Random(f"fedlora-client-test/{split_seed}/{client_id}")


def participation_probabilities(seed: int) -> random.Random:
    """The generator of the clients' drawn participation probabilities (``participation=bernoulli``)."""
    return random.Random(f"fedlora-participation-probabilities/{seed}")


def participation(seed: int, server_round: int) -> random.Random:
    """The generator of who takes part in one round under ``participation=bernoulli`` (one draw per client)."""
    return random.Random(f"fedlora-participation/{seed}/{server_round}")


def compression(seed: int, server_round: int, client_id: int) -> int:
    """A 62-bit seed for a randomised compressor's choices in one client's message (random-k's positions)."""
    digest = hashlib.blake2b(f"fedlora-compression/{seed}/{server_round}/{client_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)
