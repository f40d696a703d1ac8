"""Interactive controls for the notebooks: ipywidgets that rebuild a plotly figure.

`explore(builder, **controls)` shows the controls above an ipywidgets Output holding the figure
builder(**values) returns; every change of a control rebuilds the figure into the Output. The
figure is written into the Output's `outputs` state rather than captured with `with output:`:
capture routes messages by parent id, which nbclient (papermill) mishandles - a KeyError with
widget state off, and cells that stall with it on - while a state update is an ordinary widget
message. (Updating a display by its id does not reach JupyterLab from a widget callback.)
Figures are plain plotly Figures shown with the notebook renderer: plotly 7's FigureWidget needs
anywidget, which fa2lab does not require. The `Explorer` keeps the last figure and error, so
tests drive it without a browser or a kernel.
"""

from __future__ import annotations

import ipywidgets as widgets


class Explorer:
    def __init__(self, builder, controls: dict, initial=None):
        if not controls:
            raise ValueError("explore needs at least one control, e.g. block=int_slider(64, 16, 256)")
        for name, w in controls.items():
            if not isinstance(w, widgets.ValueWidget):
                raise TypeError(f"control {name!r} must be an ipywidgets value widget, got {type(w).__name__}")
        self.builder, self.controls = builder, dict(controls)
        self.output = widgets.Output()
        self.widget = widgets.VBox([widgets.HBox(list(controls.values()),
                                                 layout=widgets.Layout(flex_flow="row wrap")), self.output])
        self.figure, self.error, self.calls, self._displayed = initial, None, 0, False
        for w in controls.values():
            w.observe(self.update, names="value")
        if initial is None:
            self.update()

    def values(self) -> dict:
        return {name: w.value for name, w in self.controls.items()}

    def update(self, change=None):
        """Rebuild the figure from the controls' values; an error is shown in place of the figure
        (and kept in `.error`), so a bad combination of values never breaks the controls."""
        self.calls += 1
        try:
            self.figure, self.error = self.builder(**self.values()), None
        except Exception as exc:  # noqa: BLE001 - shown to the user, the controls keep working
            self.figure, self.error = None, f"{type(exc).__name__}: {exc}"
        if self._displayed:
            self._render()
        return self.figure

    def _render(self):
        # A plotly Figure's own mime bundle (renderer: plotly.io.renderers.default); IPython's
        # display formatter would call the figure's _ipython_display_, which publishes it as an
        # output of the cell instead of returning it.
        if self.error is None and hasattr(self.figure, "_repr_mimebundle_"):
            data = self.figure._repr_mimebundle_()
        else:
            data = {"text/plain": self.error if self.error is not None else repr(self.figure)}
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    def _repr_mimebundle_(self, **kwargs):
        self._displayed = True
        self._render()
        return self.widget._repr_mimebundle_(**kwargs)


def explore(builder, initial=None, **controls) -> Explorer:
    """Controls (ipywidgets value widgets, keyword = builder argument) driving builder(**values).
    `initial`: a figure already built from the controls' starting values, shown without a rebuild."""
    return Explorer(builder, controls, initial)


def int_slider(value: int, lo: int, hi: int, step: int = 1, description: str = "") -> widgets.IntSlider:
    """An IntSlider that updates when released (rebuilding a figure on every pixel is slow)."""
    return widgets.IntSlider(value=value, min=lo, max=hi, step=step, description=description,
                             continuous_update=False, style={"description_width": "initial"})


def float_slider(value: float, lo: float, hi: float, step: float, description: str = "") -> widgets.FloatSlider:
    return widgets.FloatSlider(value=value, min=lo, max=hi, step=step, description=description,
                               continuous_update=False, style={"description_width": "initial"})


def choice(value, options, description: str = "") -> widgets.Dropdown:
    return widgets.Dropdown(value=value, options=list(options), description=description)
