"""The Kubernetes operator: ``VirtualMachine`` resources become runner pods.

It imports :mod:`corral.spec` and the runner contract, never the manager: the cluster's API
server is its store. :mod:`corral.k8s.crd` generates the CRD, :mod:`corral.k8s.resources`
builds a VM's pod, claims and display secret (pure functions), :mod:`corral.k8s.api` is the
small httpx client the runner pod uses (the runner's document source and status sink live in
:mod:`corral.k8s.runner`), and :mod:`corral.k8s.operator` is the kopf operator.
"""
