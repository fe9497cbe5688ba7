"""Discovery: where the engines are, read from outside the gateway (Kubernetes pods and EndpointSlices).

:mod:`pdgate.gateway.discovery.kube_watch` keeps a local copy of the objects that match a label
selector through the Kubernetes list/watch protocol (it needs the ``kubernetes`` extra, lightkube;
import it where it is used, not here).
"""
