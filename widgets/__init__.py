"""ipywidgets panels for steering a model from JupyterLab; they use only ``workbench``'s thin API.

>>> from widgets import Workbench
>>> Workbench(wb.load("default"))       # last in a cell: search, dials, side-by-side chat, plots  # doctest: +SKIP
"""

from .chat import ChatPanel
from .dials import SteeringDials
from .inspection import InspectPanel
from .lens import DirectionPanel, LensPanel
from .monitor import MonitorPanel
from .norms import NormsPanel
from .pages import PageView
from .picker import FeaturePicker
from .stream import StreamText
from .workbench import Workbench

__all__ = ["ChatPanel", "DirectionPanel", "FeaturePicker", "InspectPanel", "LensPanel", "MonitorPanel", "NormsPanel",
           "PageView", "SteeringDials", "StreamText", "Workbench"]
