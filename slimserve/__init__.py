"""slimserve: latency-adaptive image classification from one weight-shared dynamic network.

The parts follow the data flow, each a folder at the repository's top level, imported under this
namespace: :mod:`slimserve.models` (networks, training, bundles), :mod:`slimserve.searcher` (the
ranked subnet table), :mod:`slimserve.server` (serving it per request) and
:mod:`slimserve.loadtest` (proving it under load). :mod:`slimserve.cli` assembles the command.
"""
