//! A minimal synchronous netlink client: one request, wait for its acknowledgement (or
//! the end of its dump). Used for rtnetlink here and for sock_diag (`ports`). The socket
//! belongs to the namespace of the thread that opened it, and can then be used from any
//! thread.

use std::fmt::Debug;
use std::io;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const RECV_BUFFER: usize = 64 * 1024;

pub(crate) struct Rtnl {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Rtnl {
    /// Open a route netlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Rtnl> {
        Rtnl::open_protocol(NETLINK_ROUTE)
    }

    /// Open a netlink socket of `protocol` in the calling thread's network namespace.
    pub(crate) fn open_protocol(protocol: isize) -> io::Result<Rtnl> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            socket,
            sequence: 0,
            buffer: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Send `message` with `flags` (plus REQUEST and ACK) and collect the replies until the
    /// kernel acknowledges it. A kernel error comes back as the matching OS error.
    pub(crate) fn request<T>(&mut self, message: T, flags: u16) -> io::Result<Vec<T>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + Debug,
    {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.header.length as usize];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let mut replies = Vec::new();
        loop {
            self.buffer.clear();
            let len = self.socket.recv(&mut self.buffer, 0)?;
            let mut offset = 0;
            while offset < len {
                let reply = NetlinkMessage::<T>::deserialize(&self.buffer[offset..len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let size = reply.header.length as usize;
                if size == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink reply with zero length",
                    ));
                }
                offset += size;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// Index of the link called `name`, or `None` if there is none.
    pub(crate) fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::GetLink(message), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODEV.raw_os_error()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Set or clear IFF_UP on the link called `name`.
    pub(crate) fn set_link_up(&mut self, name: &str, up: bool) -> io::Result<()> {
        let index = self
            .link_index(name)?
            .ok_or_else(|| io::Error::from_raw_os_error(rustix::io::Errno::NODEV.raw_os_error()))?;
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = if up {
            LinkFlags::Up
        } else {
            LinkFlags::empty()
        };
        message.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::NewLink(message), 0)
            .map(drop)
    }
}
