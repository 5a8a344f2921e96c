"""LitServe's continuous-batching loop, as `serve` runs it.

LitServe's `ContinuousBatchingLoop` takes requests off its queue in the background (its
`schedule_task` calls `add_request`) and calls the API's `step` while any request is active,
sending each `Output` to the API server. Three things are changed here:

- a step that has no message for anyone (every row's text held back while it may begin a stop
  string) is a normal step, not a fault to log and sleep 10 ms on;
- the steps run on the API's one decoding thread, always the same (compiled steps and CUDA
  graphs are kept per thread), and while one step decodes, the previous step's messages are sent;
- with nothing to do it waits a millisecond at a time instead of spinning on the event loop.
"""

import asyncio
import logging

from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT = 0.001  # seconds between looks for a first request; a step never waits

logger = logging.getLogger(__name__)


class JoiningLoop(ContinuousBatchingLoop):
    async def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        """Steps while any request is active, on the API's decoding thread (`lit_api.decoder`, where its setup
        warmed the compiled steps up)."""
        loop = asyncio.get_running_loop()
        while not lit_api.has_active_requests():
            await asyncio.sleep(IDLE_WAIT)
        step = None
        try:
            step = loop.run_in_executor(lit_api.decoder, lit_api.step, None)
            while step is not None:
                outputs = await step
                # the next step decodes while this one's messages go out
                step = loop.run_in_executor(lit_api.decoder, lit_api.step, None) if lit_api.has_active_requests() else None
                for output in outputs:
                    self.send(output, lit_api, transport)
        except Exception as error:  # noqa: BLE001 - a bug in a step: every request in flight gets a 500, the server goes on
            logger.exception("the decoding step failed")
            if step is not None and not step.done():  # a step still decoding: let it end before forgetting its rows
                await asyncio.wait([step])
            for uid, response_queue_id in self.response_queue_ids.items():
                self.put_error_response(transport, response_queue_id, uid, error, LoopResponseType.STREAMING)
            self.response_queue_ids.clear()
            self.active_sequences.clear()
            lit_api.reset()

    def send(self, output, lit_api, transport) -> None:
        response_queue_id = self.response_queue_ids[output.uid]
        if output.status == LitAPIStatus.FINISH_STREAMING:
            self.put_response(transport, response_queue_id, output.uid, "", output.status, LoopResponseType.STREAMING)
            self.mark_completed(output.uid)
            return
        data = lit_api.format_encoded_response(lit_api.encode_response(output.output))
        self.put_response(transport, response_queue_id, output.uid, data, output.status, LoopResponseType.STREAMING)
