//! The real terminal: raw mode and the alternate screen while the view is up, restored on every
//! way out (return, error, panic, SIGTERM), and keys read on a thread of their own.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
};
use tokio::sync::mpsc;

use super::model::Key;

/// The terminal in raw mode on the alternate screen; given back on drop. ratatui's panic hook
/// gives it back on a panic too.
pub struct Screen {
    pub terminal: DefaultTerminal,
}

impl Screen {
    pub fn enter() -> std::io::Result<Screen> {
        Ok(Screen {
            terminal: ratatui::try_init()?,
        })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// What the keyboard and the terminal say.
pub enum Input {
    Key(Key),
    Resize,
}

/// Reads keys and resizes on a thread, until `stop` is set.
pub fn read_input(stop: Arc<AtomicBool>) -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if !event::poll(Duration::from_millis(100)).unwrap_or(false) {
                continue;
            }
            let input = match event::read() {
                Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => {
                    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
                    match key.code {
                        KeyCode::Char('c') if ctrl => Some(Key::CtrlC),
                        KeyCode::Char(c) => Some(Key::Char(c)),
                        KeyCode::Up => Some(Key::Up),
                        KeyCode::Down => Some(Key::Down),
                        KeyCode::Enter => Some(Key::Enter),
                        KeyCode::Esc => Some(Key::Esc),
                        KeyCode::Backspace => Some(Key::Backspace),
                        _ => None,
                    }
                    .map(Input::Key)
                }
                Ok(Event::Resize(_, _)) => Some(Input::Resize),
                _ => None,
            };
            if let Some(input) = input
                && tx.blocking_send(input).is_err()
            {
                return;
            }
        }
    });
    rx
}
