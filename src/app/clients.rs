//! The App's clients: which connections are open, whether each may report values without a
//! token, the namespace of its uniques, and its unfinished jobs.
//!
//! A client is named by a [`ConnId`]; a stale id (of a connection that has gone, whose slot
//! another now holds) finds nothing. Must not: end a job (the App does, and then tells this
//! room), or decide trust (the shell says at open; [`super::reports`] decides what it allows).

use super::ConnId;
use super::quota::Submitter;
use super::uniques::Namespace;
use crate::gearman::client::JobTag;

#[derive(Debug, Default)]
struct Client {
    generation: u32,
    open: bool,
    trusted: bool,
    /// Prefix of this client's uniques on the gearmand side, so they never meet another
    /// client's (`--shared-uniques` leaves it empty).
    namespace: Namespace,
    /// Its unfinished jobs, oldest first; boxed, and made with the first job, so that a client
    /// without jobs keeps 8 bytes here rather than an empty `Vec`'s 24 (every open connection
    /// has a record: issue 22's idle-memory goal).
    #[allow(clippy::box_collection, reason = "8 bytes in every record, not 24; one allocation per client")]
    jobs: Option<Box<Vec<JobTag>>>,
    /// Whose quota its background jobs and pings count against.
    submitter: Option<Submitter>,
}

/// Clients by slab key, as the shell numbers its connections.
#[derive(Debug, Default)]
pub(super) struct Clients {
    slots: Vec<Client>,
}

impl Clients {
    fn get(&self, id: ConnId) -> Option<&Client> {
        self.slots.get(id.key as usize).filter(|c| c.open && c.generation == id.generation)
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Client> {
        self.slots.get_mut(id.key as usize).filter(|c| c.open && c.generation == id.generation)
    }

    /// A client finished its handshake.
    pub(super) fn open(&mut self, id: ConnId, trusted: bool, namespace: Namespace, submitter: Submitter) {
        let key = id.key as usize;
        if self.slots.len() <= key {
            self.slots.resize_with(key + 1, Client::default);
        }
        let submitter = Some(submitter);
        self.slots[key] =
            Client { generation: id.generation, open: true, trusted, namespace, jobs: None, submitter };
    }

    /// A client has gone: its unfinished jobs, for the App to end (None: it was not open).
    pub(super) fn close(&mut self, id: ConnId) -> Option<Vec<JobTag>> {
        let client = self.get_mut(id)?;
        client.open = false;
        Some(client.jobs.take().map_or_else(Vec::new, |jobs| *jobs))
    }

    /// May report values without a token (see [`super::is_trusted_peer`]).
    pub(super) fn is_trusted(&self, id: ConnId) -> bool {
        self.get(id).is_some_and(|c| c.trusted)
    }

    pub(super) fn submitter(&self, id: ConnId) -> Option<Submitter> {
        self.get(id).and_then(|c| c.submitter)
    }

    pub(super) fn namespace(&self, id: ConnId) -> Option<&[u8]> {
        self.get(id).map(|c| &c.namespace[..])
    }

    /// The client's unfinished jobs, oldest first (None: it is not open).
    pub(super) fn jobs(&self, id: ConnId) -> Option<&[JobTag]> {
        self.get(id).map(|c| c.jobs.as_deref().map_or(&[][..], |jobs| &jobs[..]))
    }

    pub(super) fn add_job(&mut self, id: ConnId, tag: JobTag) {
        if let Some(client) = self.get_mut(id) {
            client.jobs.get_or_insert_default().push(tag);
        }
    }

    pub(super) fn forget_job(&mut self, id: ConnId, tag: JobTag) {
        if let Some(jobs) = self.get_mut(id).and_then(|c| c.jobs.as_mut()) {
            jobs.retain(|t| *t != tag);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every open connection has a record here: keep it from growing back (issue 22).
    #[test]
    fn a_client_record_stays_small() {
        let size = std::mem::size_of::<super::Client>();
        assert!(size <= 48, "Client: {size}");
    }
}
