"""ipywidgets panels for steering a model from JupyterLab; they use only ``workbench``'s thin API.

>>> from widgets import Workbench
>>> Workbench(wb.load("default"))       # last in a cell: search, dials, side-by-side chat, plots  # doctest: +SKIP
"""

from .chat import ChatPanel
from .dials import SteeringDials
from .inspection import InspectPanel
from .norms import NormsPanel
from .picker import FeaturePicker
from .stream import StreamText
from .workbench import Workbench

__all__ = ["ChatPanel", "FeaturePicker", "InspectPanel", "NormsPanel", "SteeringDials", "StreamText", "Workbench"]
