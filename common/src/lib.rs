//! What the dispatcher and the worker share: the job schema, its status, and the
//! names of the queues, Redis keys and channels both sides must agree on.
