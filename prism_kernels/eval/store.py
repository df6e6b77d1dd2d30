"""A resumable result store: one JSON file of finished cells, written atomically
after every cell, so an interrupted sweep restarts where it stopped."""
from __future__ import annotations

import json
import os
from pathlib import Path


class ResultStore:
    def __init__(self, path):
        self.path = Path(path)
        self.data = {"meta": {}, "cells": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            self.data.setdefault("meta", {})
            self.data.setdefault("cells", {})

    def __contains__(self, key) -> bool:
        return key in self.data["cells"]

    def get(self, key):
        return self.data["cells"].get(key)

    def put(self, key: str, value: dict) -> None:
        self.data["cells"][key] = value
        self.save()

    def set_meta(self, **meta) -> None:
        self.data["meta"].update(meta)
        self.save()

    @property
    def meta(self) -> dict:
        return self.data["meta"]

    def cells(self) -> dict:
        return dict(self.data["cells"])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
