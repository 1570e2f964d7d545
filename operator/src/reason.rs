//! The reasons of the conditions the operator writes and of the Events it
//! publishes, in one enum at the bottom of the module tree: `status`,
//! `resolve` and `local` all name them, and none depends on another for it.

tidepool_common::text_enum! {
    /// The reason of a condition the operator writes, or of an Event it
    /// publishes: PascalCase, one word per cause.
    pub enum Reason {
        /// Not reconciled yet, or the node-local Service not written yet.
        Pending => "Pending",
        /// The target resolved to no address.
        NoAddresses => "NoAddresses",
        /// No node runs an agent.
        NoAgents => "NoAgents",
        /// An agent refused the pool.
        AgentRejected => "AgentRejected",
        /// Some agents do not run the generation yet.
        Progressing => "Progressing",
        /// Every agent runs the pool (also the Event when it becomes so).
        Ready => "Ready",
        /// The Event of a pool that stopped being ready.
        NotReady => "NotReady",
        /// Every agent runs the generation.
        AllAgentsSynced => "AllAgentsSynced",
        /// Not degraded.
        AsExpected => "AsExpected",
        /// The Event of a pool no longer degraded.
        Recovered => "Recovered",
        /// The target Service does not exist.
        ServiceNotFound => "ServiceNotFound",
        /// The target Service lacks the port.
        PortNotFound => "PortNotFound",
        /// The target Service has no ready endpoint.
        NoReadyEndpoints => "NoReadyEndpoints",
        /// Another pool holds the `listenPort`.
        ListenPortTaken => "ListenPortTaken",
        /// The node-local Service reaches an agent on every node.
        Serving => "Serving",
        /// The Event of a node-local Service that started serving.
        LocalServiceServing => "LocalServiceServing",
        /// Some nodes have no ready agent endpoint.
        NodesWithoutEndpoint => "NodesWithoutEndpoint",
        /// A Service of that name exists and the pool does not own it.
        ServiceNameTaken => "ServiceNameTaken",
        /// The operator runs without an agent selector.
        AgentSelectorMissing => "AgentSelectorMissing",
        /// A write of the node-local Service's objects failed.
        WriteFailed => "WriteFailed",
        /// Not observed long enough for tuning advice.
        Observing => "Observing",
        /// Observed long enough, and no stream was seen.
        NoTraffic => "NoTraffic",
        /// The settings running match the tuning advice.
        AsAdvised => "AsAdvised",
        /// The settings running differ from the tuning advice.
        AdviceDiffers => "AdviceDiffers",
        /// The Event of a pool's advice that changed.
        AdviceChanged => "AdviceChanged",
        /// The Event of advised settings applied (`spec.tuning.mode: Apply`).
        Tuned => "Tuned",
    }
}
