"""The scene spec of the synthetic world: what one image shows, as data.

A :class:`Scene` is one to three flat shapes (:class:`SceneObject`: colour, shape, size,
centre) on white, with the relation that orders them or the lone object's position. Objects sit
in the cells of a :data:`GRID` x :data:`GRID` board, one object per cell.
:mod:`model.synthetic` draws, renders and captions scenes; :mod:`model.queries` asks short
questions of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Far apart in hue or lightness, and none close to the white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "purple": (130, 50, 180),
    "pink": (255, 120, 200),
    "black": (20, 20, 20),
}
BACKGROUND = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# The board: objects are centred in its cells (give or take a pixel). At the demo model's 64 px
# its cells are exactly the ViLT's 16-pixel patches, so one patch sees one whole object: with
# objects straddling patches at random offsets a small ViLT hardly learns shapes (a supervised
# probe read them at 0.65 after 1,500 steps; on the board, 1.00 from step 750 — BENCHMARKS.md §1b).
GRID = 4
# Half the side of an object's bounding box, as a fraction of the image side: at 64 px a large
# object is 13 pixels across in a 16-pixel cell, so a pixel of jitter keeps it inside.
SIZES: dict[str, float] = {"small": 0.06, "large": 0.1}
RELATIONS: tuple[str, ...] = ("left of", "above")  # objects[i] <relation> objects[i + 1]
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")  # of a lone object


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``x``, ``y`` are its centre as fractions of the image side (0 = left/top)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, tuple(SIZES)),
        ):
            if value not in allowed:
                raise ValueError(f"SceneObject {name} must be one of {allowed}, got {value!r}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"SceneObject centre must lie in [0, 1]^2, got ({self.x}, {self.y})")


@dataclass(frozen=True)
class Scene:
    """What one image shows.

    With two or three objects, ``objects`` are in reading order along ``relation``: for
    ``"left of"`` left to right, for ``"above"`` top to bottom, and ``position`` is None. A
    lone object has ``relation`` None and a ``position`` from :data:`POSITIONS`.
    """

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a Scene has 1 to 3 objects, got {len(self.objects)}")
        if len(self.objects) == 1:
            if self.relation is not None or self.position not in POSITIONS:
                raise ValueError(
                    f"a one-object Scene needs relation None and position in {POSITIONS}, "
                    f"got relation={self.relation!r}, position={self.position!r}"
                )
        elif self.relation not in RELATIONS or self.position is not None:
            raise ValueError(
                f"a Scene of {len(self.objects)} objects needs relation in {RELATIONS} and "
                f"position None, got relation={self.relation!r}, position={self.position!r}"
            )
        else:
            along = [obj.x if self.relation == "left of" else obj.y for obj in self.objects]
            if along != sorted(along):
                raise ValueError(
                    f"objects must be in reading order along {self.relation!r}, got centres {along}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Scene:
        objects = tuple(SceneObject(**fields) for fields in record["objects"])
        return cls(objects, record.get("relation"), record.get("position"))
