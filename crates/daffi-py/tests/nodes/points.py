"""A dataclass both ends of a test import by the same module name: pickle finds a class
by its module and name, so both ends need it (as with the Python daffi)."""

from dataclasses import dataclass


@dataclass
class Point:
    x: int
    y: int
