"""Data for federations: dataset values, partitioners, bundled and synthetic sources, file loaders.

* :mod:`fedge.data.dataset`: the values (:class:`Dataset`, :class:`DataSpec`,
  :class:`FederatedData`) and :func:`make_dataset`, which validates raw arrays.
* :mod:`fedge.data.partition`: iid, Dirichlet label skew, shards and power-law
  quantity skew, and :func:`parse_partitioner` for ``--partition``.
* :mod:`fedge.data.sources`: bundled digits, FedProx synthetic data, and
  :func:`load_federated` for ``--data``.
* :mod:`fedge.data.files`: device-side ``.npz`` and ``.csv`` loaders.

Importing this package needs numpy alone; scikit-learn is never imported (the
digits are read from its data file).
"""

from __future__ import annotations

from fedge.data.dataset import Dataset, DataSpec, FederatedData, make_dataset
from fedge.data.files import load_csv, load_file, load_npz
from fedge.data.partition import (
    PARTITIONER_NAMES,
    Partitioner,
    parse_partitioner,
    partition_dirichlet,
    partition_iid,
    partition_powerlaw,
    partition_shards,
)
from fedge.data.sources import (
    DATA_NAMES,
    load_digits_dataset,
    load_federated,
    synthetic_fedprox,
)

__all__ = [
    "DATA_NAMES",
    "PARTITIONER_NAMES",
    "DataSpec",
    "Dataset",
    "FederatedData",
    "Partitioner",
    "load_csv",
    "load_digits_dataset",
    "load_federated",
    "load_file",
    "load_npz",
    "make_dataset",
    "parse_partitioner",
    "partition_dirichlet",
    "partition_iid",
    "partition_powerlaw",
    "partition_shards",
    "synthetic_fedprox",
]
