"""Hand-written fakes of the gateway's real interfaces, for the fast (unit) layer of the tests.

* :mod:`fakes.upstream`: :class:`FakeUpstreamResponse`, a scripted engine reply (chunks, errors,
  gates, stalls) that records close and abort;
* :mod:`fakes.responder`: :class:`FakeResponder`, what the client would receive;
* :mod:`fakes.engine`: :class:`FakeEngineAdapter` (the adapter interface) over a deterministic
  :class:`FakeModel`;
* :mod:`fakes.fleet`: a real Cluster (and Proxy) over fake engines;
* :mod:`fakes.streams`: a streamed request in flight through a real LiveStream, and a failover
  callback that continues it elsewhere;
* :mod:`fakes.clock`: :class:`FakeClock`; :mod:`fakes.tasks`: the ``no_leaked_tasks`` fixture;
  :mod:`fakes.sse`: building and parsing SSE events.

Imported as ``fakes`` (tests/conftest.py puts tests/ on ``sys.path``).
"""
