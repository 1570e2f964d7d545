//! An index-linked doubly linked list whose nodes live in a [`Slab`].
//!
//! go-micro links `*poolConn` values with `pre`/`next` pointers. Here a node is
//! a slab key and the links are keys too: the same O(1) push, unlink and move
//! between lists, with no `unsafe` and no reference counting. One slab can
//! hold the nodes of several lists (the available and the busy list share the
//! address's connection slab); a node is on at most one list at a time.

use slab::Slab;

/// The `prev`/`next` keys a node carries. `None` at either end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Links {
    prev: Option<usize>,
    next: Option<usize>,
}

/// A slab value that can sit on a [`List`].
pub(crate) trait Linked {
    fn links(&self) -> &Links;
    fn links_mut(&mut self) -> &mut Links;
}

/// A list head: first and last key, and the length. The nodes are in the
/// slab passed to every call; the caller keeps slab and list together.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct List {
    head: Option<usize>,
    tail: Option<usize>,
    len: usize,
}

impl List {
    pub(crate) fn front(&self) -> Option<usize> {
        self.head
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Links `key` in at the front. The node must not be on any list.
    pub(crate) fn push_front<T: Linked>(&mut self, slab: &mut Slab<T>, key: usize) {
        debug_assert_eq!(*slab[key].links(), Links::default());
        let old = self.head;
        *slab[key].links_mut() = Links {
            prev: None,
            next: old,
        };
        match old {
            Some(old) => slab[old].links_mut().prev = Some(key),
            None => self.tail = Some(key),
        }
        self.head = Some(key);
        self.len += 1;
    }

    /// Links `key` in at the back. The node must not be on any list.
    pub(crate) fn push_back<T: Linked>(&mut self, slab: &mut Slab<T>, key: usize) {
        debug_assert_eq!(*slab[key].links(), Links::default());
        let old = self.tail;
        *slab[key].links_mut() = Links {
            prev: old,
            next: None,
        };
        match old {
            Some(old) => slab[old].links_mut().next = Some(key),
            None => self.head = Some(key),
        }
        self.tail = Some(key);
        self.len += 1;
    }

    /// Unlinks `key`, which must be on this list.
    pub(crate) fn unlink<T: Linked>(&mut self, slab: &mut Slab<T>, key: usize) {
        let Links { prev, next } = std::mem::take(slab[key].links_mut());
        match prev {
            Some(p) => slab[p].links_mut().next = next,
            None => {
                debug_assert_eq!(self.head, Some(key));
                self.head = next;
            }
        }
        match next {
            Some(n) => slab[n].links_mut().prev = prev,
            None => {
                debug_assert_eq!(self.tail, Some(key));
                self.tail = prev;
            }
        }
        self.len -= 1;
    }

    /// Unlinks and returns the first node.
    pub(crate) fn pop_front<T: Linked>(&mut self, slab: &mut Slab<T>) -> Option<usize> {
        let key = self.head?;
        self.unlink(slab, key);
        Some(key)
    }

    /// The keys from front to back. Walks the list: O(len), for the cold
    /// paths (reconfiguration, retiring an address), never for acquire.
    pub(crate) fn keys<T: Linked>(&self, slab: &Slab<T>) -> Vec<usize> {
        let mut keys = Vec::with_capacity(self.len);
        let mut at = self.head;
        while let Some(key) = at {
            keys.push(key);
            at = slab[key].links().next;
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Node(Links);
    impl Linked for Node {
        fn links(&self) -> &Links {
            &self.0
        }
        fn links_mut(&mut self) -> &mut Links {
            &mut self.0
        }
    }

    #[test]
    fn moves_between_two_lists_sharing_one_slab() {
        let mut slab = Slab::new();
        let (mut a, mut b) = (List::default(), List::default());
        let keys: Vec<usize> = (0..4).map(|_| slab.insert(Node::default())).collect();
        for &k in &keys {
            a.push_front(&mut slab, k);
        }
        assert_eq!(a.keys(&slab), vec![3, 2, 1, 0]);
        // Middle, head and tail removals.
        a.unlink(&mut slab, 2);
        b.push_back(&mut slab, 2);
        a.unlink(&mut slab, 3);
        b.push_front(&mut slab, 3);
        a.unlink(&mut slab, 0);
        b.push_back(&mut slab, 0);
        assert_eq!(a.keys(&slab), vec![1]);
        assert_eq!(b.keys(&slab), vec![3, 2, 0]);
        assert_eq!((a.len(), b.len()), (1, 3));
        assert_eq!(b.pop_front(&mut slab), Some(3));
        assert_eq!(a.pop_front(&mut slab), Some(1));
        assert_eq!(a.pop_front(&mut slab), None);
        assert_eq!(a.front(), None);
        assert_eq!(b.keys(&slab), vec![2, 0]);
    }
}
