//! `during(..)`: what events do in some states.

use std::fmt;

use crate::activities::Activities;
use crate::instance::SagaState;

use super::{Event, State, StateMachine};

/// What events do in some states: `when(event, |b| ..)` and `ignore(event)`, chained.
pub struct During<'m, S> {
    pub(super) machine: &'m mut StateMachine<S>,
    pub(super) states: Vec<usize>,
    pub(super) any: bool,
}

impl<S> fmt::Debug for During<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("During")
            .field("states", &self.states)
            .field("any", &self.any)
            .finish_non_exhaustive()
    }
}

impl<S: SagaState> During<'_, S> {
    /// When `event` arrives in these states, run the activities `f` builds (called once
    /// per state).
    pub fn when<M: Send + Sync + 'static>(
        self,
        event: Event<M>,
        f: impl Fn(Activities<S, M>) -> Activities<S, M>,
    ) -> Self {
        let built: Vec<(Option<usize>, Activities<S, M>)> = if self.any {
            vec![(None, f(Activities::new()))]
        } else {
            self.states
                .iter()
                .map(|&state| (Some(state), f(Activities::new())))
                .collect()
        };
        let mut targets = Vec::new();
        for (_, activities) in &built {
            activities.targets(&mut targets);
        }
        self.machine
            .targets
            .extend(targets.into_iter().map(State::index));
        let initial = self.states.contains(&State::INITIAL.0);
        let Some(typed) = self.machine.typed_mut(event) else {
            self.machine
                .problems
                .push("`when` was given an event of another state machine".to_string());
            return self;
        };
        for (state, activities) in built {
            match state {
                None => {
                    let current = typed.any.take().unwrap_or_else(Activities::new);
                    typed.any = Some(current.append(activities));
                }
                Some(state) => {
                    let current = typed
                        .by_state
                        .remove(&state)
                        .unwrap_or_else(Activities::new);
                    typed.by_state.insert(state, current.append(activities));
                }
            }
        }
        let slot = &mut self.machine.events[event.index];
        slot.handled = true;
        slot.initial |= initial;
        self
    }

    /// Accepts `event` in these states and does nothing (MassTransit's `Ignore`).
    pub fn ignore<M: Send + Sync + 'static>(self, event: Event<M>) -> Self {
        let states = self.states.clone();
        match self.machine.typed_mut(event) {
            Some(typed) => {
                typed.ignored.extend(states);
                self.machine.events[event.index].handled = true;
            }
            None => self
                .machine
                .problems
                .push("`ignore` was given an event of another state machine".to_string()),
        }
        self
    }
}
