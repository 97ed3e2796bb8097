//! Drawing the live view: a pure function of the model, so it is tested on ratatui's
//! `TestBackend`.
//!
//! ```text
//! tracer top · 6/6 probes · events lost 0 · sort failures/s · 12:03:04
//! ┌ upstreams ─────────────────────────────────────────────────────────────────┐
//! │ PROXY  UPSTREAM        ATT/S FAIL/S FAIL%  CAUSE     LAST  TREND (60 s)    │
//! │ nginx  10.0.0.5:8000    10.0   10.0  100%  refused   0s    ▁▃▅▇█████       │
//! └────────────────────────────────────────────────────────────────────────────┘
//! ┌ 10.0.0.5:8000 ──────────────────┐┌ recent failures ─────────────────────────┐
//! │ nginx (pid 812) → …: 312 …     ││ 12:03:04 nginx[812] 10.0.0.5:8000 refused │
//! └─────────────────────────────────┘└──────────────────────────────────────────┘
//!  ↑↓ select  s sort  / filter  c cause  p pause  ? help  q quit
//! ```

use std::time::{Duration, SystemTime};

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, Wrap},
};
use tracer_common::Outcome;

use super::model::{App, Mode, RouteRow, WINDOW};
use crate::classify::{explain_route, human_duration};

/// The colour of a cause: refusals, resets and timeouts each their own.
pub fn cause_color(cause: Outcome) -> Color {
    match cause {
        Outcome::Refused => Color::Red,
        Outcome::ConnectTimeout | Outcome::ResponseTimeout => Color::Yellow,
        Outcome::ResetBeforeResponse | Outcome::ResetMidResponse => Color::Magenta,
        Outcome::ClosedBeforeResponse => Color::LightMagenta,
        Outcome::Unreachable => Color::Cyan,
        Outcome::NoEphemeralPort | Outcome::ConnectError => Color::LightBlue,
        Outcome::UnixMissing | Outcome::UnixRefused => Color::Red,
        Outcome::UnixBacklogFull => Color::Yellow,
        Outcome::UnixPermission => Color::LightBlue,
        Outcome::FdExhausted => Color::LightRed,
        Outcome::TlsHandshakeFailed | Outcome::PlaintextToTls => Color::LightGreen,
        Outcome::Connected | Outcome::ConnectAbandoned | Outcome::RequestAbandoned => Color::Gray,
    }
}

fn cause_by_name(name: &str) -> Option<Outcome> {
    Outcome::ALL.iter().copied().find(|o| o.name() == name)
}

pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    let show_panes = area.height >= 16;
    let [header, table, panes, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(if show_panes {
            (area.height / 3).max(7)
        } else {
            0
        }),
        Constraint::Length(1),
    ])
    .areas(area);
    render_header(frame, app, header);
    render_table(frame, app, table);
    if show_panes {
        let [detail, recent] =
            Layout::horizontal([Constraint::Percentage(45), Constraint::Percentage(55)])
                .areas(panes);
        render_detail(frame, app, detail);
        render_recent(frame, app, recent);
    }
    render_footer(frame, app, footer);
    if app.mode == Mode::Help {
        render_help(frame, area);
    }
}

fn render_header(frame: &mut Frame, app: &App, area: Rect) {
    let health = &app.health;
    let probes_style = if health.probes_attached < health.probes_total {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new().fg(Color::Green)
    };
    let lost_style = if health.events_lost > 0 {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    let mut spans = vec![
        Span::styled("tracer top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(" · "),
        Span::styled(
            format!("{}/{} probes", health.probes_attached, health.probes_total),
            probes_style,
        ),
        Span::raw(" · "),
        Span::styled(format!("events lost {}", health.events_lost), lost_style),
    ];
    if health.events_sampled_out > 0 {
        // Storm: the kernel sent a sample of the failures; the counts are exact.
        spans.push(Span::raw(format!(
            " · sampled out {}",
            health.events_sampled_out
        )));
    }
    if app.events_dropped > 0 {
        // The view could not keep up with the stream; the counts are unaffected.
        spans.push(Span::styled(
            format!(" · view skipped {}", app.events_dropped),
            Style::new().fg(Color::Yellow),
        ));
    }
    spans.push(Span::raw(format!(" · sort {}", app.sort.name())));
    if !app.filter.is_empty() {
        spans.push(Span::raw(format!(" · filter \"{}\"", app.filter)));
    }
    if let Some(cause) = app.cause_filter {
        spans.push(Span::raw(" · cause "));
        spans.push(Span::styled(
            cause.name(),
            Style::new().fg(cause_color(cause)),
        ));
    }
    if app.paused {
        spans.push(Span::styled(
            " · PAUSED",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    spans.push(Span::raw(format!(" · {} · {}", app.source, clock(app.now))));
    if let Some(problem) = &app.problem {
        spans.push(Span::styled(
            format!(" · {problem}"),
            Style::new().fg(Color::Red),
        ));
    }
    frame.render_widget(Line::from(spans), area);
}

/// HH:MM:SS (UTC) of a time.
fn clock(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..19).unwrap_or(&text).to_string()
}

fn age(now: SystemTime, then: Option<SystemTime>) -> String {
    match then {
        None => "-".into(),
        Some(then) => {
            let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
            if secs < 60 {
                format!("{secs}s")
            } else if secs < 3600 {
                format!("{}m", secs / 60)
            } else {
                format!("{}h", secs / 3600)
            }
        }
    }
}

/// A text sparkline of `values`, scaled to their maximum, `width` cells wide (newest right).
pub fn sparkline(values: &[u64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let values = &values[values.len().saturating_sub(width)..];
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|v| {
            if *v == 0 {
                ' '
            } else {
                BARS[((v * 8).div_ceil(max.max(1)) as usize)
                    .saturating_sub(1)
                    .min(7)]
            }
        })
        .collect()
}

fn rate(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// The table's columns, fewest first to go on narrow terminals.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Column {
    Proxy,
    Upstream,
    Attempts,
    Failures,
    Ratio,
    Cause,
    Last,
    Trend,
}

fn columns(width: u16) -> Vec<Column> {
    use Column::*;
    match width {
        0..60 => vec![Upstream, Failures, Cause],
        60..80 => vec![Proxy, Upstream, Failures, Ratio, Cause],
        80..110 => vec![Proxy, Upstream, Attempts, Failures, Ratio, Cause, Last],
        _ => vec![
            Proxy, Upstream, Attempts, Failures, Ratio, Cause, Last, Trend,
        ],
    }
}

fn render_table(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::bordered().title(" upstreams ");
    let rows = app.visible_rows();
    if rows.is_empty() {
        let text = if app.all_rows().is_empty() {
            "no outbound connections seen yet".to_string()
        } else {
            "no upstream matches the filter (/ to change it, c for the cause)".to_string()
        };
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let middle = Rect {
            y: inner.y + inner.height / 2,
            height: 1.min(inner.height),
            ..inner
        };
        frame.render_widget(
            Paragraph::new(text)
                .style(Style::new().fg(Color::DarkGray))
                .centered(),
            middle,
        );
        return;
    }
    let cols = columns(area.width);
    let trend_width = area.width.saturating_sub(100).clamp(10, 60) as usize;
    let widths: Vec<Constraint> = cols
        .iter()
        .map(|c| match c {
            Column::Proxy => Constraint::Length(15),
            Column::Upstream => Constraint::Min(15),
            Column::Attempts | Column::Failures => Constraint::Length(7),
            Column::Ratio => Constraint::Length(6),
            Column::Cause => Constraint::Length(22),
            Column::Last => Constraint::Length(5),
            Column::Trend => Constraint::Length(trend_width as u16),
        })
        .collect();
    let header = Row::new(cols.iter().map(|c| match c {
        Column::Proxy => "PROXY",
        Column::Upstream => "UPSTREAM",
        Column::Attempts => "ATT/S",
        Column::Failures => "FAIL/S",
        Column::Ratio => "FAIL%",
        Column::Cause => "CAUSE",
        Column::Last => "LAST",
        Column::Trend => "FAILURES, 60 s",
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body = rows.iter().enumerate().map(|(i, row)| {
        let cells = cols.iter().map(|c| cell(app, row, *c, trend_width));
        let mut style = match (row.failing(), row.leading_cause) {
            (true, Some(cause)) => Style::new()
                .fg(cause_color(cause))
                .add_modifier(Modifier::BOLD),
            _ => Style::new(),
        };
        if i == app.selected {
            style = style.add_modifier(Modifier::REVERSED);
        }
        Row::new(cells).style(style)
    });
    frame.render_widget(Table::new(body, widths).header(header).block(block), area);
}

fn cell(app: &App, row: &RouteRow, column: Column, trend_width: usize) -> Cell<'static> {
    let text = match column {
        Column::Proxy => row.id.proxy.clone(),
        Column::Upstream => row.id.upstream.clone(),
        Column::Attempts => rate(row.attempts_per_s),
        Column::Failures => rate(row.failures_per_s),
        Column::Ratio => row
            .failure_ratio()
            .map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
        Column::Cause => row
            .leading_cause
            .map_or("-".into(), |c| c.name().to_string()),
        Column::Last => age(app.now, row.last_failure),
        Column::Trend => sparkline(&row.trend, trend_width),
    };
    Cell::from(text)
}

fn render_detail(frame: &mut Frame, app: &App, area: Rect) {
    let Some(row) = app.selected_row() else {
        frame.render_widget(Block::bordered().title(" detail "), area);
        return;
    };
    let mut lines = Vec::new();
    let sentence = match row.leading_cause {
        Some(cause) => explain_route(
            &row.id.proxy,
            row.pid,
            &row.id.upstream,
            cause,
            row.window.get(&cause).copied().unwrap_or(0),
            WINDOW,
        ),
        None => format!(
            "{} → {}: no failures in the last {} s",
            row.id.proxy,
            row.id.upstream,
            WINDOW.as_secs()
        ),
    };
    lines.push(Line::styled(
        sentence,
        Style::new()
            .fg(row.leading_cause.map_or(Color::Green, cause_color))
            .add_modifier(Modifier::BOLD),
    ));
    if let Some(root_cause) = &row.root_cause {
        lines.push(Line::styled(
            format!("root cause: {root_cause}"),
            Style::new().add_modifier(Modifier::BOLD),
        ));
    }
    lines.push(Line::raw(format!(
        "attempts: {} in 60 s ({}/s), failures {}",
        row.window_attempts(),
        rate(row.attempts_per_s),
        row.window_failures()
    )));
    let failures: Vec<(&Outcome, &u64)> =
        row.total.iter().filter(|(o, _)| o.is_failure()).collect();
    if !failures.is_empty() {
        lines.push(Line::raw("by cause (60 s / since start):"));
        for (cause, total) in failures {
            let window = row.window.get(cause).copied().unwrap_or(0);
            lines.push(Line::from(vec![
                Span::raw("  "),
                Span::styled(
                    format!("{:<24}", cause.name()),
                    Style::new().fg(cause_color(*cause)),
                ),
                Span::raw(format!("{window} / {total}")),
            ]));
        }
    }
    if let (Some(p50), Some(p99)) = (row.connect_p50, row.connect_p99) {
        lines.push(Line::raw(format!(
            "connect time: p50 ≤ {}, p99 ≤ {}",
            human_duration(p50),
            human_duration(p99)
        )));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(match &row.upstream_container {
                Some(container) => format!(" {} (container {container}) ", row.id.upstream),
                None => format!(" {} ", row.id.upstream),
            })),
        area,
    );
}

fn render_recent(frame: &mut Frame, app: &App, area: Rect) {
    let rows = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = app
        .visible_recent()
        .take(rows)
        .map(|e| {
            let color = cause_by_name(&e.cause).map_or(Color::White, cause_color);
            let time = e.time.get(11..19).unwrap_or(&e.time).to_string();
            let mut evidence = format!(" {}ms", e.waited_ms);
            if let Some(errno) = &e.errno_name {
                evidence.push_str(&format!(" {errno}"));
            }
            let proxy = match &e.proxy_container {
                Some(c) => format!("{}[{}]@{}", e.comm, e.pid, c.name),
                None => format!("{}[{}]", e.comm, e.pid),
            };
            let upstream = match &e.upstream_container {
                Some(c) => format!("{} ({})", e.upstream, c.name),
                None => e.upstream.clone(),
            };
            Line::from(vec![
                Span::styled(time, Style::new().fg(Color::DarkGray)),
                Span::raw(format!(" {proxy} {upstream} ")),
                Span::styled(e.cause.clone(), Style::new().fg(color)),
                Span::styled(evidence, Style::new().fg(Color::DarkGray)),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" recent failures ")),
        area,
    );
}

fn render_footer(frame: &mut Frame, app: &App, area: Rect) {
    let line = match &app.mode {
        Mode::Filter(text) => Line::from(vec![
            Span::styled(" filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{text}▏")),
            Span::styled(
                "  Enter apply · Esc cancel",
                Style::new().fg(Color::DarkGray),
            ),
        ]),
        _ => Line::styled(
            " ↑↓ select  s sort  / filter  c cause  p pause  ? help  q quit",
            Style::new().fg(Color::DarkGray),
        ),
    };
    frame.render_widget(line, area);
}

fn render_help(frame: &mut Frame, area: Rect) {
    let text = vec![
        Line::styled("tracer top", Style::new().add_modifier(Modifier::BOLD)),
        Line::raw(""),
        Line::raw("↑ ↓  k j   select an upstream"),
        Line::raw("s          sort by failures/s, failure %, attempts/s, upstream"),
        Line::raw("/          filter by text (proxy, upstream or container)"),
        Line::raw("c          show one cause only (cycles)"),
        Line::raw("p          pause and resume"),
        Line::raw("q  Esc     quit"),
        Line::raw(""),
        Line::raw("Counts are exact (from the kernel); rates are per refresh,"),
        Line::raw("windows are the last 60 s. Causes: docs/causes.md"),
    ];
    let width = 66.min(area.width);
    let height = (text.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(text).block(Block::bordered().title(" help ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::export::live::model::tests::busy_app;

    fn draw(app: &App, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(frame, app)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn text(buffer: &Buffer) -> String {
        let area = buffer.area;
        (0..area.height)
            .map(|y| {
                (0..area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The position of the first occurrence of `needle` on screen.
    fn find(buffer: &Buffer, needle: &str) -> Option<(u16, u16)> {
        text(buffer).lines().enumerate().find_map(|(y, line)| {
            let chars: Vec<char> = line.chars().collect();
            let needle: Vec<char> = needle.chars().collect();
            chars
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .map(|x| (x as u16, y as u16))
        })
    }

    #[test]
    fn the_failing_upstream_comes_first_in_its_causes_colour_with_the_explanation() {
        let app = busy_app();
        let buffer = draw(&app, 140, 32);
        let screen = text(&buffer);
        assert!(screen.contains("6/6 probes"), "{screen}");
        let (x, y) = find(&buffer, "10.0.0.5:8000").expect("failing upstream shown");
        let (_, healthy_y) = find(&buffer, "10.0.0.6:8000").expect("healthy upstream shown");
        assert!(y < healthy_y, "failing first:\n{screen}");
        assert_eq!(buffer[(x, y)].fg, Color::Red, "refused rows are red");
        assert!(
            buffer[(x, y)].modifier.contains(Modifier::REVERSED),
            "selected"
        );
        let (cx, cy) = find(&buffer, "refused").unwrap();
        assert_eq!(cy, y);
        assert_eq!(buffer[(cx, cy)].fg, Color::Red);
        assert_eq!(
            buffer[(x, healthy_y)].fg,
            Color::Reset,
            "healthy rows stay plain"
        );
        assert!(
            screen.contains("FAILURES, 60 s"),
            "trend column on wide terminals:\n{screen}"
        );
        assert!(screen.contains("██"), "{screen}");
        // The detail pane explains the selected upstream in one sentence (wrapped).
        assert!(
            screen.contains("nginx (pid 812) → 10.0.0.5:8000: 100 connections"),
            "{screen}"
        );
        assert!(
            screen.contains("nothing is listening on 10.0.0.5:8000"),
            "{screen}"
        );
        assert!(
            screen.contains("  refused                 100 / 100"),
            "{screen}"
        );
        assert!(screen.contains("recent failures"), "{screen}");
        assert!(
            screen.contains("nginx[812] 10.0.0.5:8000 refused"),
            "{screen}"
        );
    }

    #[test]
    fn the_detail_pane_gives_the_root_cause() {
        let mut app = busy_app();
        let mut event = crate::export::live::model::tests::event("10.0.0.5:8000", "refused", 812);
        event.root_cause = Some("upstream_oom_killed".into());
        event.root_cause_detail =
            Some("gunicorn (pid 1234, listening on 10.0.0.5:8000) was OOM-killed".into());
        app.on_event(event);
        let screen = text(&draw(&app, 160, 34));
        assert_eq!(
            screen
                .matches("root cause: gunicorn (pid 1234, listening on")
                .count(),
            1,
            "once:\n{screen}"
        );
    }

    #[test]
    fn containers_are_named_beside_the_proxy_and_the_upstream() {
        let mut app = busy_app();
        let mut event = crate::export::live::model::tests::event("10.0.0.5:8000", "refused", 812);
        let container = crate::export::live::model::tests::container;
        event.proxy_container = Some(container("edge"));
        event.upstream_container = Some(container("web-1"));
        app.on_event(event);
        let screen = text(&draw(&app, 160, 34));
        assert!(
            screen.contains("nginx[812]@edge 10.0.0.5:8000 (web-1) refused"),
            "{screen}"
        );
        assert!(
            screen.contains(" 10.0.0.5:8000 (container web-1) "),
            "{screen}"
        );
    }

    #[test]
    fn a_narrow_terminal_keeps_upstream_failures_and_cause() {
        let app = busy_app();
        let buffer = draw(&app, 50, 12);
        let screen = text(&buffer);
        assert!(screen.contains("10.0.0.5:8000"), "{screen}");
        assert!(screen.contains("refused"), "{screen}");
        assert!(screen.contains("FAIL/S"), "{screen}");
        assert!(!screen.contains("PROXY"), "{screen}");
        assert!(
            !screen.contains("recent failures"),
            "no room for panes:\n{screen}"
        );
    }

    #[test]
    fn before_any_connection_it_says_so() {
        let app = App::new("local");
        let screen = text(&draw(&app, 100, 30));
        assert!(
            screen.contains("no outbound connections seen yet"),
            "{screen}"
        );
    }

    #[test]
    fn help_and_filter_prompt_show_over_the_view() {
        let mut app = busy_app();
        app.mode = Mode::Help;
        let screen = text(&draw(&app, 100, 30));
        assert!(screen.contains("sort by failures/s"), "{screen}");
        app.mode = Mode::Filter("10.0".into());
        let screen = text(&draw(&app, 100, 30));
        assert!(screen.contains("filter: 10.0"), "{screen}");
        app.mode = Mode::Normal;
        app.paused = true;
        let screen = text(&draw(&app, 140, 30));
        assert!(screen.contains("PAUSED"), "{screen}");
    }

    #[test]
    fn sparklines_scale_to_their_maximum() {
        assert_eq!(sparkline(&[0, 1, 2, 4, 8], 10), " ▁▂▄█");
        assert_eq!(sparkline(&[5, 5, 5], 2), "██");
        assert_eq!(sparkline(&[], 5), "");
    }
}
