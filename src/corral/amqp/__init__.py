"""The message API: aetherscale's RabbitMQ protocol served by corral's manager (the ``amqp``
daemon service, ``corral serve --amqp URL``), beside the REST API and independent of it.

:mod:`~corral.amqp.protocol` reads requests and writes aetherscale's reply envelope (no broker),
:mod:`~corral.amqp.commands` carries each command out on the manager,
:mod:`~corral.amqp.requests` remembers replies so a redelivered request is applied once, and
:mod:`~corral.amqp.service` is the consumer on aio-pika. docs/amqp.md has the message reference.
"""
