"""Open a compiled ``*_edgetpu.tflite`` graph on a Coral Edge TPU.

pycoral's ``make_interpreter`` is used when Coral's pycoral is installed (Dev
Board, or a host with Coral's Python packages); otherwise the libedgetpu
delegate is loaded by file name into tflite-runtime / ai-edge-litert, which is
all pycoral does underneath. Nothing here is imported until asked for.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Optional

from gemma_edge.errors import ArtifactError, EdgeTpuUnavailableError

from .runtime import interpreter_api

# pycoral/utils/edgetpu.py: libedgetpu's file name per OS.
EDGETPU_SHARED_LIB = {
    "Linux": "libedgetpu.so.1",
    "Darwin": "libedgetpu.1.dylib",
    "Windows": "edgetpu.dll",
}
USB_IDS = ("1a6e:089a", "18d1:9302")  # Global Unichip (before firmware load), Google (after)


def delegate_library() -> str:
    return EDGETPU_SHARED_LIB.get(platform.system(), "libedgetpu.so.1")


def make_edgetpu_interpreter(model_path: Path, device: Optional[str] = None,
                             num_threads: Optional[int] = None) -> Any:
    """An interpreter with the Edge TPU delegate; ``device`` is ':0', 'usb', 'pci', 'usb:1'..."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: compiled Edge TPU graph missing")
    try:
        from pycoral.utils.edgetpu import make_interpreter  # Coral's pycoral, not PyPI's namesake

        try:
            return make_interpreter(str(model_path), device=device)
        except (ValueError, RuntimeError) as exc:
            raise EdgeTpuUnavailableError(_explain(exc, device)) from exc
    except ImportError:
        pass
    Interpreter, load_delegate, _ = interpreter_api()
    options = {"device": device} if device else {}
    try:
        delegate = load_delegate(delegate_library(), options)
    except (ValueError, OSError, RuntimeError) as exc:
        raise EdgeTpuUnavailableError(_explain(exc, device)) from exc
    try:
        kwargs = {"num_threads": num_threads} if num_threads else {}
        return Interpreter(model_path=str(model_path), experimental_delegates=[delegate], **kwargs)
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        if "edgetpu-custom-op" in text or "version" in text.lower():
            raise ArtifactError(
                f"{model_path}: the Edge TPU runtime refused the compiled graph ({text.strip()}). "
                "It was probably compiled for a newer runtime than the installed libedgetpu: "
                "update libedgetpu1-std/-max, or recompile with `gemma-edge compile "
                "--min-runtime N` matching the board") from exc
        raise EdgeTpuUnavailableError(_explain(exc, device)) from exc


def _explain(exc: BaseException, device: Optional[str]) -> str:
    return (f"no Edge TPU available{f' at {device!r}' if device else ''} ({exc}). Check that a "
            f"Coral device is attached (lsusb shows {' or '.join(USB_IDS)}, or /dev/apex_0 "
            f"exists) and that libedgetpu is installed ({delegate_library()}, apt package "
            "libedgetpu1-std); scripts/setup-usb-accelerator.sh sets it up")
