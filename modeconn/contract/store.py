"""Put an artifact folder into the BentoML model store, and find it there again.

The store location follows BentoML's own rule (env BENTOML_HOME, default ~/bentoml), so
tests point both the storing code and the server at a temporary BENTOML_HOME.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from modeconn.contract.artifact import load_artifact


def save_to_bentoml_store(
    artifact_dir: Path, name: str, labels: dict[str, str], metadata: dict[str, Any]
) -> str:
    """Verify `artifact_dir`, copy it into a new version of model `name`; return the tag.

    Atomic: `bentoml.models.create` writes into a temporary folder and registers the model
    only when the block exits without an exception, so a failed copy or a failed check of
    the copy leaves nothing in the store.
    """
    import bentoml  # deferred: the exporter imports this module, keep its import cheap

    artifact_dir = Path(artifact_dir)
    load_artifact(artifact_dir)  # refuse to store a broken artifact
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        target = Path(model.path)
        for item in artifact_dir.iterdir():
            if item.is_dir():
                shutil.copytree(item, target / item.name)
            else:
                shutil.copy2(item, target / item.name)
        load_artifact(target)  # the copy is what will be served: check it, not the source
    return str(model.tag)


def artifact_path_in_store(tag: str) -> Path:
    """The folder of a stored model (name or name:version), e.g. to load it in tests."""
    import bentoml

    return Path(bentoml.models.get(tag).path)
