"""argparse types shared by the benchmarks: a value that does not parse is refused by argparse in
one line (``script.py: error: argument --flag: expected ..., got ...``) before anything runs."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterable


def positive_ints(text: str) -> list[int]:
  """Comma-separated positive integers (batch sizes)."""
  try:
    values = [int(b) for b in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
  return values


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
  """A finite number of ``kind`` (int or float) >= ``low``."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not low <= value < math.inf:
      raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                       f">= {low:g}, got {text!r}")
    return value

  return parse


def names(known: Iterable[str]) -> Callable[[str], list[str]]:
  """Comma-separated distinct names, each one of ``known``."""
  known = list(known)

  def parse(text: str) -> list[str]:
    values = text.split(",")
    if any(v not in known for v in values) or len(set(values)) < len(values):
      raise argparse.ArgumentTypeError(f"expected distinct comma-separated names among "
                                       f"{', '.join(known)}, got {text!r}")
    return values

  return parse
