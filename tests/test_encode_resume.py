"""Resuming an interrupted encoding re-uses a leftover shard only if it holds exactly the rows
its index stands for now: same row count is not enough when the shard size changed."""
from __future__ import annotations

import numpy as np
import torch

from umarvel.retrieval import encode as encode_module
from umarvel.retrieval.encode import encode_set, load_encoded

ITEMS = [{"did": f"0:{i}"} for i in range(6)]


class IdEmbedder:
    """Item `0:i` -> a unit vector that names i; records the ids it encodes."""

    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, items, batch_size=32, **options):
        self.encoded.extend(item["did"] for item in items)
        numbers = torch.tensor([float(item["did"].split(":")[1]) for item in items])
        return torch.nn.functional.normalize(torch.stack([torch.ones_like(numbers), numbers], dim=1), dim=1).numpy()


def as_rank_1_of_2(patch) -> None:
    """What a launched job's second process sees (umarvel.process reads the launcher's env)."""
    patch.setenv("RANK", "1")
    patch.setenv("WORLD_SIZE", "2")


def run(embedder, directory, shard_size):
    return encode_set(embedder, lambda start, stop: ITEMS[start:stop], len(ITEMS), "did", directory,
                      fingerprint="f", shard_size=shard_size, progress=False)


def test_a_leftover_shard_with_the_same_row_count_but_another_start_is_re_encoded(tmp_path, monkeypatch):
    straight = run(IdEmbedder(), tmp_path / "straight", shard_size=2)
    # A 2-rank run with shard_size 4 over 6 items: rank 1 finished shard 1 (items 4, 5),
    # rank 0 was killed inside shard 0, so no manifest was written.
    with monkeypatch.context() as patch:
        as_rank_1_of_2(patch)
        assert run(IdEmbedder(), tmp_path / "resumed", shard_size=4) is None
    assert (tmp_path / "resumed" / "shard-00001.ids.txt").read_text().split() == ["0:4", "0:5"]
    # Resumed in one process with shard_size 2: shard 1 now means items 2, 3 (also 2 rows).
    embedder = IdEmbedder()
    resumed = run(embedder, tmp_path / "resumed", shard_size=2)
    assert resumed.ids == [item["did"] for item in ITEMS]
    np.testing.assert_array_equal(resumed.vectors(), straight.vectors())
    assert embedder.encoded == [item["did"] for item in ITEMS]
    assert load_encoded(tmp_path / "resumed").ids == resumed.ids


def test_a_shard_interrupted_between_its_two_files_is_re_encoded(tmp_path, monkeypatch):
    """Vectors and ids of a shard are two files: a run killed after writing one of them must not
    leave a pair that passes the resume check with the other from an older run."""
    straight = run(IdEmbedder(), tmp_path / "straight", shard_size=2)
    directory = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        as_rank_1_of_2(patch)
        run(IdEmbedder(), directory, shard_size=4)  # shard 1 = items 4, 5, both files
        writes = []
        original = encode_module.atomic_path

        def killed_on_second_write(path):
            writes.append(path)
            if len(writes) == 2:
                raise KeyboardInterrupt
            return original(path)

        patch.setattr(encode_module, "atomic_path", killed_on_second_write)
        try:
            run(IdEmbedder(), directory, shard_size=2)  # rank 1 of 2: shard 1 = items 2, 3
        except KeyboardInterrupt:
            pass
    assert len(writes) == 2
    resumed = run(IdEmbedder(), directory, shard_size=2)
    assert resumed.ids == [item["did"] for item in ITEMS]
    np.testing.assert_array_equal(resumed.vectors(), straight.vectors())


def test_every_rank_keys_an_adapter_to_the_same_cache_directory(tiny_model_dir, tmp_path):
    """PEFT keeps target_modules as a set, whose order changes with each process's hash seed;
    ranks that disagreed on the model fingerprint wrote and waited on different directories
    (a launched eval of an adapter hung or died at a barrier)."""
    import os
    import subprocess
    import sys

    from umarvel.config import ModelConfig
    from umarvel.modeling.embedder import Embedder

    adapter = Embedder.from_config(ModelConfig(backbone=str(tiny_model_dir)), trainable=True).save_pretrained(tmp_path / "adapter")
    script = ("import sys; from umarvel.modeling.embedder import Embedder; "
              "from umarvel.retrieval.encode import model_fingerprint; "
              "print(model_fingerprint(Embedder.from_pretrained(sys.argv[1])))")
    fingerprints = {
        subprocess.run([sys.executable, "-c", script, str(adapter)], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()[-1]
        for seed in ("1", "2", "3")
    }
    assert len(fingerprints) == 1
