"""A profiler window: a jax.profiler trace of a few training steps, for TensorBoard.

config.profile.first_step and num_steps choose the steps (numbered as in the
progress lines: step 1 is the first one, which also compiles); num_steps = 0, the
default, traces nothing. The trace lands in WORKDIR/profile/plugins/profile/<time>/
(*.xplane.pb and a Perfetto *.trace.json.gz), which TensorBoard's profile tab opens:
`pip install tensorboard-plugin-profile; tensorboard --logdir WORKDIR/profile`.
Every process traces its own host. On gs:// the trace is written to a local
temporary directory first (the profiler writes local files) and copied up when the
window closes.
"""
import tempfile

import jax

from entityclip_jax import storage

PROFILE_DIR = "profile"


class ProfileWindow:
    def __init__(self, cfg, workdir):
        self.first, self.count = int(cfg.first_step), int(cfg.num_steps)
        self.destination = storage.join(workdir, PROFILE_DIR)
        self.local = None  # the temporary directory of a trace bound for gs://
        self.active = False

    def before_step(self, step):
        """Called with the number of the step about to run."""
        if self.count <= 0 or self.active or step != self.first:
            return
        target = self.destination
        if storage.is_remote(target):
            self.local = tempfile.TemporaryDirectory(prefix="entityclip-profile-")
            target = self.local.name
        jax.profiler.start_trace(target)
        self.active = True

    def after_step(self, step, state):
        """Called with the number of the step that just ran and its output state."""
        if self.active and step >= self.first + self.count - 1:
            jax.block_until_ready(state)  # the window holds the devices' work, not only its dispatch
            self.stop()

    def stop(self):
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if self.local is not None:
            for item in storage.files(self.local.name):
                storage.copy(item, storage.join(self.destination, str(item)[len(self.local.name) + 1:]))
            self.local.cleanup()
            self.local = None
        if jax.process_index() == 0:
            print(f"profile of steps {self.first}-{self.first + self.count - 1} in {self.destination}: "
                  f"tensorboard --logdir {self.destination} (profile tab, tensorboard-plugin-profile)", flush=True)
