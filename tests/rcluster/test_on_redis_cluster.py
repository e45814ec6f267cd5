"""tests/cluster's cross-node tests, run again with the nodes on a Redis
Cluster (sharded pub/sub, positions in GEO cells, state keys spread over
slots): orders, positions, area views, chat, the queue, presence, nearest
search and dispatch's exactly-one. The fixtures of this package make
`redis_server` the cluster."""

from tests.cluster.test_cluster import (
    test_area_watch_batches_for_a_technician_on_another_node,
    test_assignment_through_another_node_reaches_the_technicians_node,
    test_broadcast_dispatch_across_nodes_exactly_one_accept_wins,
    test_en_route_through_another_node_arms_the_geofence,
    test_order_events_cross_nodes_once,
    test_positions_go_only_to_nodes_that_watch,
    test_positions_reach_watchers_on_other_nodes,
    test_presence_across_nodes,
    test_queue_assignment_is_least_loaded_cluster_wide,
    test_reassigned_technician_on_another_node_leaves_the_order_stream,
    test_support_chat_across_nodes,
)

__all__ = [
    "test_area_watch_batches_for_a_technician_on_another_node",
    "test_assignment_through_another_node_reaches_the_technicians_node",
    "test_broadcast_dispatch_across_nodes_exactly_one_accept_wins",
    "test_en_route_through_another_node_arms_the_geofence",
    "test_order_events_cross_nodes_once",
    "test_positions_go_only_to_nodes_that_watch",
    "test_positions_reach_watchers_on_other_nodes",
    "test_presence_across_nodes",
    "test_queue_assignment_is_least_loaded_cluster_wide",
    "test_reassigned_technician_on_another_node_leaves_the_order_stream",
    "test_support_chat_across_nodes",
]
