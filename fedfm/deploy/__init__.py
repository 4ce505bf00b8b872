"""Deployment on Flower's engine: an always-on server and edge clients on separate machines.

fedfm does not carry messages itself: Flower's SuperLink and SuperNodes do
(HTTPS, node authentication, chunked transfers). On top of them fedfm runs
its own :class:`~fedfm.server.server.Server` and
:class:`~fedfm.client.client.ClientApp` unchanged:

* :mod:`fedfm.deploy.server_app` — the Flower ServerApp: builds the server side
  of a run from the submitted config (:mod:`fedfm.deploy.serve`) and drives it
  through Flower's Grid (:mod:`fedfm.deploy.driver`; FedBuff/FedAsync in
  :mod:`fedfm.deploy.asynchronous`; secure aggregation's stages in
  :mod:`fedfm.deploy.secure`), writing the same run folder as ``fedfm run``;
  a continual run keeps the server up across stages with the simulation's
  stage loop, the nodes cutting their own rows into stages
  (:mod:`fedfm.deploy.continual`);
* :mod:`fedfm.deploy.client_app` — the Flower ClientApp: a thin forwarder that
  Flower starts for every message; it hands the message to the node's
  resident worker (:mod:`fedfm.deploy.node`), which keeps the foundation
  model, the node's data and its private client state in memory between rounds;
* :mod:`fedfm.deploy.messages` — what a Flower message carries: fedfm's own
  encoded payload (safetensors bytes, codecs applied) and a small JSON header;
* :mod:`fedfm.deploy.launch` — the processes a user starts
  (``fedfm deploy superlink | node | submit``) and :mod:`fedfm.deploy.credentials`
  the TLS certificates and node keys they use.

The ClientApp side (``client_app``, ``messages``, ``link``) imports neither
torch nor transformers: Flower starts it once per message.
"""
