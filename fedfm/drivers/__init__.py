"""Drivers: they sample clients, move messages between the clients and the server, and keep time.

Synchronous simulation, asynchronous FedBuff/FedAsync on a virtual clock,
multi-process workers (torch.distributed) and the continual stage loop.
"""
