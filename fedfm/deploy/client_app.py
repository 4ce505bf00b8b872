"""The Flower ClientApp of a fedfm deployment: forwards each message to the node's resident worker.

Flower starts this module in a fresh process for every message, so it stays
light (flwr, numpy and the stdlib): it adds the run's config (Flower's run
config key ``fedfm-config``) to the server's header and hands both to the
worker whose state folder the SuperNode's node config names
(``fedfm-node``, set by ``fedfm deploy node``). The worker
(:mod:`fedfm.deploy.node`) trains with the model it keeps in memory and
returns fedfm's encoded update, which goes back unchanged.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfm.deploy.link import LinkError, call
from fedfm.deploy.messages import MessageError, pack, unpack, unpack_extra

NODE_KEY, CONFIG_KEY = "fedfm-node", "fedfm-config"

app = ClientApp()


def forward(msg: Message, context: Context) -> Message:
    """The worker's reply to ``msg``; any failure becomes a reply with an ``error`` line."""
    folder = context.node_config.get(NODE_KEY)
    try:
        if not isinstance(folder, str):
            raise LinkError(f"this SuperNode has no '{NODE_KEY}' node config: start it with `fedfm deploy node`")
        header, payload = unpack(msg.content)
        header["config"] = context.run_config.get(CONFIG_KEY)
        reply, out = call(folder, header, payload, unpack_extra(msg.content))
    except (LinkError, MessageError) as err:
        reply, out = {"error": str(err)}, None
    return Message(pack(reply, out), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return forward(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return forward(msg, context)
