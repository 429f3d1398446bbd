"""Many cells behind one front: HAProxy's configuration made from the list of cells
(haproxy.py), and the local cluster that runs the cells, the proxy and a status endpoint on
one machine (`kernel-service cluster`)."""
