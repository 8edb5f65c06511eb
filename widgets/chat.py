"""``ChatPanel``: baseline and steered replies streamed side by side, token by token, with history."""

from __future__ import annotations

import asyncio
import time

import ipywidgets as w
import traitlets

import workbench as wb

from ._tasks import Panel
from .stream import StreamText

COLUMNS = ("baseline", "steered")


def _interventions(variant) -> list[dict]:
    return variant.get_interventions() if variant is not None else []


class ChatPanel(Panel):
    """Send a message; both columns stream at once (one request each, batched by the engine).

    ``variant`` is the steering of the right column (``Workbench`` keeps it in step with the dials);
    ``turns`` counts finished turns (observe it to refresh plots). With ``auto_regenerate`` on, a
    change of ``variant`` regenerates the last steered reply.

    >>> chat = ChatPanel(model, variant=wb.Variant("default").set(pirate, 0.4))  # doctest: +SKIP
    >>> chat.send("Give me tourist information about Tokyo."); await chat.wait()  # doctest: +SKIP
    """

    variant = traitlets.Instance(wb.Variant, allow_none=True)
    turns = traitlets.Int(0)
    busy = traitlets.Bool(False)     # True while replies stream

    def __init__(self, source, variant=None, max_tokens: int = 128, **kwargs):
        self.message = w.Textarea(placeholder="Message (Shift+Enter in the box adds a line)", rows=2,
                                  layout=w.Layout(width="100%"))
        self.message.add_class("wb-message")
        self.send_button = w.Button(description="Send", icon="paper-plane", button_style="primary")
        self.send_button.add_class("wb-send")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.stop_button.add_class("wb-stop")
        self.regenerate_button = w.Button(description="Regenerate", icon="refresh", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.auto_regenerate = w.Checkbox(value=True, description="regenerate when the dials move", indent=False)
        self.system = w.Textarea(placeholder="(none)", description="system", rows=2, layout=w.Layout(width="100%"))
        self.prefill = w.Text(placeholder="(none) text the assistant's reply starts with", description="prefill",
                              layout=w.Layout(width="100%"))
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature")
        self.max_tokens = w.IntSlider(value=max_tokens, min=1, max=1024, description="max tokens")
        self.seed = w.IntText(value=0, description="seed")
        # steered text tends to loop; a repetition penalty (both columns, so they stay comparable) often rescues it
        self.repetition_penalty = w.FloatSlider(value=1.0, min=1.0, max=2.0, step=0.05, description="rep. penalty")
        options = w.Accordion(children=[w.VBox([self.system, self.prefill, w.HBox([self.temperature, self.max_tokens]),
                                                w.HBox([self.seed, self.repetition_penalty])])],
                              titles=("Options",), selected_index=None)
        self.baseline_view = StreamText(kind="baseline", layout=w.Layout(width="100%"))
        self.steered_view = StreamText(kind="steered", layout=w.Layout(width="100%"))
        columns = w.HBox([
            w.VBox([w.HTML("<b>Baseline</b>"), self.baseline_view], layout=w.Layout(width="50%")),
            w.VBox([w.HTML("<b style='color:#cf6a00'>Steered</b>"), self.steered_view], layout=w.Layout(width="50%")),
        ], layout=w.Layout(width="100%"))
        self.status = w.HTML("")
        self.status.add_class("wb-chat-status")
        self.history = {c: [] for c in COLUMNS}
        self.timing: dict = {}
        self._reply_start = {c: 0 for c in COLUMNS}
        self._turn = None
        self._active: set = set()
        self.monitor = None   # a MonitorPanel: the steered column streams with its probes (and condition), drawn live
        super().__init__(source, [w.HTML("<b>Chat</b>"), columns, self.message,
                                  w.HBox([self.send_button, self.stop_button, self.regenerate_button, self.clear_button,
                                          self.auto_regenerate]), self.status, options], **kwargs)
        self.add_class("wb-chat")
        self.variant = variant
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.regenerate_button.on_click(lambda _: self.regenerate(COLUMNS))
        self.clear_button.on_click(lambda _: self.clear())
        self.observe(self._on_variant, "variant")

    # -- views ---------------------------------------------------------------------------------
    def _view(self, column: str) -> StreamText:
        return self.baseline_view if column == "baseline" else self.steered_view

    def messages(self, column: str) -> list[dict]:
        """The conversation of one column as chat messages (system prompt first, when set)."""
        system = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        return system + [dict(m) for m in self.history[column]]

    @property
    def streaming(self) -> bool:
        return self._turn is not None and not self._turn.done()

    # -- actions -------------------------------------------------------------------------------
    def send(self, text: str | None = None):
        """Send ``text`` (default: the message box) to both columns; returns the turn's task."""
        text = self.message.value if text is None else text
        if not text.strip():
            self.show_error(wb.EmptyInputError("type a message first"))
            return None
        self.message.value = ""
        previous = self._turn

        async def turn():
            await self._cancel(previous)
            for column in COLUMNS:
                view = self._view(column)
                self.history[column].append({"role": "user", "content": text})
                view.append(("\n\n" if view.value else "") + f"You: {text}\n\nAssistant: ")
                self._reply_start[column] = len(view.value)
            await self._stream(COLUMNS)

        self._turn = self._spawn(turn())
        return self._turn

    def regenerate(self, columns=("steered",)):
        """Drop the last reply of ``columns`` and generate it again (with the current dials)."""
        previous = self._turn

        async def again():
            await self._cancel(previous)
            if not any(m["role"] == "user" for m in self.history["baseline"]):
                return
            for column in columns:
                if self.history[column] and self.history[column][-1]["role"] == "assistant":
                    self.history[column].pop()
                self._view(column).truncate(self._reply_start[column])
            await self._stream(tuple(columns))

        self._turn = self._spawn(again())
        return self._turn

    def stop(self) -> None:
        """Stop the replies that are streaming (the server stops generating them)."""
        if self._turn is not None:
            self._turn.cancel()

    def clear(self) -> None:
        self.stop()
        self.history = {c: [] for c in COLUMNS}
        for c in COLUMNS:
            self._view(c).clear()
            self._reply_start[c] = 0
        self.status.value = ""
        self.regenerate_button.disabled = True

    def _on_variant(self, change) -> None:
        if self.auto_regenerate.value and self.history["steered"]:
            # a baseline reply cut off by this change is regenerated too; a finished one is kept
            self.regenerate(tuple(sorted(self._active | {"steered"})) if self.streaming else ("steered",))

    @staticmethod
    async def _cancel(task) -> None:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task if isinstance(task, asyncio.Future) else asyncio.wrap_future(task)])

    # -- streaming -----------------------------------------------------------------------------
    async def _stream(self, columns) -> None:
        started = time.perf_counter()
        self.timing = {"started": started}
        self._active = set(columns)
        self.busy = True
        self.stop_button.disabled, self.regenerate_button.disabled = False, True
        self.status.value = "streaming…"
        self.show_error(None)
        try:
            name = await self.session.model_name()
            async with asyncio.TaskGroup() as group:
                for column in columns:
                    group.create_task(self._one(column, name, started))
            self.status.value = " · ".join(f"{c}: {self.timing.get(c + '_tokens', 0)} chunks" for c in columns)
        except BaseExceptionGroup as eg:  # show the first real error, not the group
            raise eg.exceptions[0] from None
        except asyncio.CancelledError:
            self.status.value = "stopped"
            raise
        finally:
            self.stop_button.disabled, self.regenerate_button.disabled = True, False
            self.busy = False
            self.turns += 1

    async def _without_bad_probes(self, stream, open_stream):
        """The watched stream; if the server refuses it before the first chunk, the reply unwatched.

        A mistyped feature id in the monitor's box must cost the plot, not the steered reply: the
        error shows in the monitor panel. With a condition the refusal stands (steering without its
        condition is not what was asked for); if the unwatched request fails too, that error stands.
        """
        chunks = aiter(stream)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            return
        except wb.APIValidationError as exc:
            self.monitor.show_error(exc)
            async for chunk in open_stream({}):
                yield chunk
            return
        yield first
        async for chunk in chunks:
            yield chunk

    async def _one(self, column: str, name: str, started: float) -> None:
        view = self._view(column)
        prefill = self.prefill.value
        messages = self.messages(column)
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
            view.append(prefill)
        reply, count = prefill, 0
        ivs = _interventions(self.variant) if column == "steered" else []
        spec = getattr(self.variant, "spec", None) if column == "steered" else None
        watch = self.monitor.request_options() if column == "steered" and self.monitor is not None else {}

        def open_stream(watch: dict):
            stream = self.client.chat.completions.create_stream(
                model=name, messages=messages, interventions=ivs or None, steering=spec, temperature=self.temperature.value,
                max_completion_tokens=self.max_tokens.value, seed=self.seed.value, continue_final_message=bool(prefill),
                repetition_penalty=self.repetition_penalty.value, **watch)
            return self.monitor.follow(stream) if watch else stream

        try:
            stream = open_stream(watch)
            if watch and "condition" not in watch:
                stream = self._without_bad_probes(stream, open_stream)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.timing[column + "_finish"] = chunk.choices[0].finish_reason
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    if count == 0:
                        self.timing[column + "_first_token"] = time.perf_counter() - started
                    count += 1
                    reply += delta
                    view.append(delta)
        finally:
            self.timing[column + "_tokens"] = count
            self.history[column].append({"role": "assistant", "content": reply})
            view.flush()
