"""What lives below the agent on a device: the signed bundle format and the A/B slot installer.

Modules, in the order a bundle meets them:

* ``keys``: Ed25519 signing keys (controller) and trusted public keys (device), with key ids.
* ``manifest``: the signed manifest and its canonical JSON form.
* ``bundle``: build, read and verify the single-file bundle (a canonical tar).
* ``sources``: ``ArtifactSource`` (bytes from an offset) and ``FileSource`` for offline installs.
* ``install_state``: the persisted state machine (states, events, transition table, record).
* ``slots``: the A/B slots, the active pointer and ``active_model()`` for the runtime.
* ``installer``: ``Installer.install()`` / ``resume()``, one small step per state.
* ``selftest``: the golden self-test with onnxruntime (imported lazily).
* ``replay``: nonces and expiry of install commands; ``faults``: test-only fault injection.
* ``cli``: ``edgefleet bundle ...`` and ``edgefleet-agent install``.

This package is imported on devices: it may use only the standard library, cryptography, numpy
and onnxruntime, never onnx or the controller's tool-chain. Nothing is imported here eagerly so
that ``import edgefleet.firmware.slots`` stays cheap for the agent.
"""
