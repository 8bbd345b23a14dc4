"""Which values are numbers and integers of any Python or numpy type, and storing them as plain
Python ints and floats: checks shared by the model and training configs and the data layer's sizes;
and the range of seeds every generator masksc seeds takes."""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from masksc.errors import DataError

_MAX_SEED = 2**63 - 1  # leidenalg takes seeds up to a C ssize_t (and uses them modulo 2**32)
MAX_MAP_SEED = 2**32 - 1  # the most UMAP, t-SNE and sklearn's PCA take as a seed (numpy's legacy random_state)


def is_number(value) -> bool:
    """Whether ``value`` is a real number of any Python or numpy type (``np.float32``, ``np.int64``
    ...); a bool is not, so ``lr=True`` is refused rather than read as 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """Whether ``value`` is an integer of any Python or numpy type (``np.int32`` ...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a number (:func:`is_number`) that stays finite as a float32, the
    precision the model and the transform compute in (1e39 and an int past float's range are not)."""
    if not is_number(value):
        return False
    try:
        as_float = float(value)
    except OverflowError:
        return False
    return abs(as_float) <= np.finfo(np.float32).max  # False for inf and NaN too


def plain_number(value):
    """``value`` as a Python int (any ``numbers.Integral``) or float (any other ``numbers.Real``:
    ``np.float32``, ``fractions.Fraction`` ...), another numpy scalar as its Python value, anything
    else (a bool included: the checks refuse it) as it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value.item() if isinstance(value, np.generic) else value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def plain_numbers(config) -> None:
    """Replace the numbers among the fields of the frozen dataclass ``config`` (also inside tuple
    fields) by :func:`plain_number`, so what a user passed is stored, compared and written to
    JSON like an int or a float."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        value = tuple(map(plain_number, value)) if isinstance(value, tuple) else plain_number(value)
        object.__setattr__(config, f.name, value)


def check_flags(optional: tuple = (), **flags) -> None:
    """Raise DataError naming each of ``flags`` (name=value) that is not True or False (a bool or
    numpy bool; those named in ``optional`` may be None too): a string such as "no" is truthy,
    and would switch it on without a word."""
    bad = [f"{name}={value!r}" for name, value in flags.items()
           if not isinstance(value, (bool, np.bool_)) and not (value is None and name in optional)]
    if bad:
        raise DataError(f"{', '.join(bad)}: a switch must be True or False; fix: pass a bool, e.g. "
                        f"{bad[0].split('=')[0]}=False.")


def is_map_seed(seed) -> bool:
    """Whether ``seed`` is an integer UMAP, t-SNE and sklearn's PCA take (in [0, MAX_MAP_SEED])."""
    return not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and 0 <= seed <= MAX_MAP_SEED


def check_seed(seed) -> int:
    """``seed`` as an int; DataError unless it is an integer in [0, 2**63 - 1] (what numpy's,
    torch's and leidenalg's generators all take). Leiden's ``flavor="leidenalg"`` uses it modulo
    2**32 and the IVF index trains its lists with it modulo 2**31 (its sampled recall check
    with all of it), so seeds that differ by a multiple of 2**32 can give the same partition
    or graph there."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MAX_SEED:
        raise DataError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}; fix: pass a non-negative "
                        "integer, e.g. seed=0.")
    return int(seed)
