"""`modeconn export`: ONNX graphs and manifest.json, checked against PyTorch, into the BentoML
model store or a folder. Three concerns, one module each: graphs.py (what each graph computes
and how it is written), parity.py (the gate every graph passes), artifact.py (sources, the
manifest, atomic writing)."""

from modeconn.training.export.artifact import (
    ExportError,
    ExportJob,
    Sources,
    collect_sources,
    export_artifact,
    export_runs,
    write_artifact,
)
from modeconn.training.export.graphs import (
    OPSET,
    Conv2dOfHeight1,
    CurveGraph,
    EnsembleGraph,
    MemberGraph,
    Normalize,
    export_onnx,
)

__all__ = ["OPSET", "Conv2dOfHeight1", "CurveGraph", "EnsembleGraph", "ExportError", "ExportJob", "MemberGraph",
           "Normalize", "Sources", "collect_sources", "export_artifact", "export_onnx", "export_runs", "write_artifact"]
