use super::*;

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn ok(intents: &[&str], events: &[&str]) -> IntentPlan {
    plan(&strings(intents), &strings(events)).expect("plan should succeed")
}

fn err(intents: &[&str], events: &[&str]) -> Vec<IntentError> {
    plan(&strings(intents), &strings(events)).expect_err("plan should fail")
}

#[test]
fn masks_match_the_docs() {
    let all = INTENTS.iter().fold(0, |m, i| m | i.mask());
    assert_eq!(all, 53608447);
    assert_eq!(all, ALL_INTENTS_MASK);
    let privileged = INTENTS
        .iter()
        .filter(|i| i.privileged)
        .fold(0, |m, i| m | i.mask());
    assert_eq!(privileged, 33026);
    assert_eq!(privileged, PRIVILEGED_MASK);
    assert_eq!(ALL_INTENTS_MASK & !PRIVILEGED_MASK, 53575421);
}

#[test]
fn table_is_in_bit_order_with_unique_bits_and_names() {
    for pair in INTENTS.windows(2) {
        assert!(
            pair[0].bit < pair[1].bit,
            "{} / {}",
            pair[0].name,
            pair[1].name
        );
    }
    let names: HashSet<_> = INTENTS.iter().map(|i| i.name).collect();
    assert_eq!(names.len(), INTENTS.len());
    assert_eq!(INTENTS.len(), 21);
    for (alias, canonical) in ALIASES {
        assert!(!names.contains(alias));
        assert!(names.contains(canonical));
    }
}

#[test]
fn event_counts() {
    assert_eq!(ALL_EVENTS.len(), 79);
    assert_eq!(NO_INTENT_EVENTS.len(), 16);
    assert!(ALL_EVENTS.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    let no_intent: HashSet<_> = NO_INTENT_EVENTS.iter().collect();
    assert_eq!(no_intent.len(), 16);
}

#[test]
fn every_event_is_either_free_or_delivered_never_both() {
    for event in ALL_EVENTS {
        let free = NO_INTENT_EVENTS.contains(event);
        let by = intents_for_event(event);
        assert!(free == by.is_empty(), "{event}: free={free}, by={by:?}");
    }
    for event in NO_INTENT_EVENTS {
        assert!(is_event(event), "{event}");
    }
    for i in INTENTS {
        for event in i.events {
            assert!(is_event(event), "{} lists unknown {event}", i.name);
        }
    }
    for (i, events) in ENRICHES {
        assert!(intent(i).is_some(), "{i}");
        assert!(events.iter().all(|e| is_event(e)));
    }
    // 79 = 16 free + 63 delivered by some intent.
    let delivered: HashSet<_> = INTENTS.iter().flat_map(|i| i.events.iter()).collect();
    assert_eq!(delivered.len(), 63);
}

#[test]
fn specific_deliveries() {
    let names = |e| -> Vec<_> { intents_for_event(e).iter().map(|i| i.name).collect() };
    assert_eq!(
        names("MESSAGE_CREATE"),
        ["GUILD_MESSAGES", "DIRECT_MESSAGES"]
    );
    assert_eq!(names("MESSAGE_DELETE_BULK"), ["GUILD_MESSAGES"]);
    assert_eq!(names("CHANNEL_PINS_UPDATE"), ["GUILDS", "DIRECT_MESSAGES"]);
    assert_eq!(names("THREAD_MEMBERS_UPDATE"), ["GUILDS"]);
    assert_eq!(names("GUILD_MEMBER_UPDATE"), ["GUILD_MEMBERS"]);
    assert_eq!(
        names("MESSAGE_POLL_VOTE_ADD"),
        ["GUILD_MESSAGE_POLLS", "DIRECT_MESSAGE_POLLS"]
    );
    assert!(names("READY").is_empty());
    assert!(names("NOT_AN_EVENT").is_empty());
    assert!(intent("MESSAGE_CONTENT").unwrap().events.is_empty());
    assert!(
        intent("GUILD_MEMBERS")
            .unwrap()
            .note
            .unwrap()
            .contains("own member")
    );
}

#[test]
fn lookup_is_exact_and_aliases_resolve() {
    assert_eq!(intent("GUILDS").unwrap().mask(), 1);
    assert_eq!(intent("DIRECT_MESSAGE_POLLS").unwrap().mask(), 1 << 25);
    assert!(intent("guilds").is_none());
    assert!(intent("GUILD_MESAGES").is_none());
    assert_eq!(intent("GUILD_BANS").unwrap().name, "GUILD_MODERATION");
    assert_eq!(
        intent("GUILD_EMOJIS_AND_STICKERS").unwrap().name,
        "GUILD_EXPRESSIONS"
    );
    assert!(is_event("MESSAGE_CREATE"));
    assert!(!is_event("message_create"));
    assert!(!is_event("HELLO"));
}

#[test]
fn names_for_mask_and_bit_check() {
    assert_eq!(
        names_for_mask(PRIVILEGED_MASK),
        ["GUILD_MEMBERS", "GUILD_PRESENCES", "MESSAGE_CONTENT"]
    );
    assert_eq!(names_for_mask(1 | 1 << 17), ["GUILDS"]);
    assert!(names_for_mask(0).is_empty());
    assert_eq!(names_for_mask(ALL_INTENTS_MASK).len(), INTENTS.len());

    assert!(check_intent_bits(0).is_ok());
    assert!(check_intent_bits(ALL_INTENTS_MASK).is_ok());
    let msg = check_intent_bits(1 | 1 << 17 | 1 << 40).unwrap_err();
    assert!(msg.contains("bit(s) 17, 40"), "{msg}");
    assert!(msg.contains("4013"), "{msg}");
}

#[test]
fn suggestions() {
    assert_eq!(suggest_intent("GUILD_MESAGES"), Some("GUILD_MESSAGES"));
    assert_eq!(suggest_intent("guild_messages"), Some("GUILD_MESSAGES"));
    assert_eq!(suggest_intent("GUILD_BAN"), Some("GUILD_MODERATION"));
    assert_eq!(suggest_intent("GULIDS"), Some("GUILDS"));
    assert_eq!(suggest_intent("BANANAS"), None);
    assert_eq!(
        closest("MESAGE_CREATE", ALL_EVENTS.iter().copied()),
        Some("MESSAGE_CREATE")
    );
    assert_eq!(
        closest("message_create", ALL_EVENTS.iter().copied()),
        Some("MESSAGE_CREATE")
    );
    assert_eq!(closest("*", ALL_EVENTS.iter().copied()), None);
    assert_eq!(closest("X", ["Y"]), Some("Y"));
    assert_eq!(closest("ABCDEFGH", ["ZYXWVUTS"]), None);
    assert_eq!(edit_distance("AB", "BA"), 1);
    assert_eq!(edit_distance("", "ABC"), 3);
    assert_eq!(edit_distance("kitten", "SITTING"), 3);
}

#[test]
fn design_example_plans_cleanly() {
    let p = ok(
        &["GUILDS", "GUILD_MESSAGES", "MESSAGE_CONTENT"],
        &["GUILD_CREATE", "MESSAGE_CREATE", "INTERACTION_CREATE"],
    );
    assert_eq!(p.bits, 1 | 512 | 32768);
    assert_eq!(
        p.events,
        ["GUILD_CREATE", "MESSAGE_CREATE", "INTERACTION_CREATE"]
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
    assert_eq!(
        p.notes[0],
        "MESSAGE_CONTENT is privileged: enable it in the Developer Portal (Applications → \
         your app → Bot → Privileged Gateway Intents) or Discord closes the connection with \
         4014"
    );
    assert!(p.notes[1].starts_with("MESSAGE_CONTENT delivers no event"));
}

#[test]
fn plan_orders_and_dedupes_intents() {
    let p = ok(
        &["GUILD_MESSAGES", "GUILDS", "GUILD_MESSAGES"],
        &["MESSAGE_CREATE", "GUILD_CREATE", "MESSAGE_CREATE"],
    );
    let names: Vec<_> = p.intents.iter().map(|i| i.name).collect();
    assert_eq!(names, ["GUILDS", "GUILD_MESSAGES"]);
    assert_eq!(p.events, ["MESSAGE_CREATE", "GUILD_CREATE"]);
    assert_eq!(
        p.warnings,
        [
            "intent \"GUILD_MESSAGES\" is listed more than once in [discord] intents",
            "event \"MESSAGE_CREATE\" is listed more than once in [discord] events",
        ]
    );
}

#[test]
fn privileged_note_for_members() {
    let p = ok(&["GUILD_MEMBERS"], &["GUILD_MEMBER_ADD"]);
    assert_eq!(p.bits, 2);
    assert_eq!(p.notes, [privileged_note("GUILD_MEMBERS")]);
    assert!(p.notes[0].starts_with("GUILD_MEMBERS is privileged: enable it in the Developer"));
}

#[test]
fn aliases_are_accepted_with_a_warning() {
    let p = ok(&["GUILD_BANS"], &["GUILD_BAN_ADD"]);
    assert_eq!(p.bits, 4);
    assert_eq!(p.intents[0].name, "GUILD_MODERATION");
    assert_eq!(
        p.warnings,
        [
            "intent name \"GUILD_BANS\" is deprecated; write \"GUILD_MODERATION\" in \
          [discord] intents (same bit)"
        ]
    );

    let p = ok(
        &["GUILD_EMOJIS_AND_STICKERS", "GUILD_EXPRESSIONS"],
        &["GUILD_STICKERS_UPDATE"],
    );
    assert_eq!(p.bits, 8);
    assert_eq!(p.intents.len(), 1);
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings[1].contains("are the same intent; keep only \"GUILD_EXPRESSIONS\""));
}

#[test]
fn unneeded_intent_is_a_warning() {
    let p = ok(&["GUILD_MESSAGES", "GUILD_PRESENCES"], &["MESSAGE_CREATE"]);
    assert_eq!(p.bits, 512 | 256);
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert_eq!(
        p.warnings[0],
        "intent \"GUILD_PRESENCES\" is declared but no subscribed event needs it (it \
         delivers PRESENCE_UPDATE); remove it from [discord] intents or subscribe to its \
         events"
    );
    // Still privileged, so still called out.
    assert!(p.notes.contains(&privileged_note("GUILD_PRESENCES")));
}

#[test]
fn enriching_intents_are_not_unneeded() {
    let p = ok(
        &["GUILD_MEMBERS", "GUILD_PRESENCES"],
        &["GUILD_MEMBERS_CHUNK"],
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);

    let p = ok(&["GUILDS", "GUILD_MEMBERS"], &["THREAD_MEMBERS_UPDATE"]);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(
        !p.notes
            .iter()
            .any(|n| n.starts_with("THREAD_MEMBERS_UPDATE"))
    );

    let p = ok(&["GUILDS"], &["THREAD_MEMBERS_UPDATE"]);
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("only when the bot itself"))
    );
}

#[test]
fn message_content_note_or_warning() {
    for event in ["MESSAGE_CREATE", "MESSAGE_UPDATE"] {
        let p = ok(&["DIRECT_MESSAGES", "MESSAGE_CONTENT"], &[event]);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert!(p.notes.iter().any(|n| n == MESSAGE_CONTENT_NOTE));
    }

    let p = ok(
        &["AUTO_MODERATION_EXECUTION", "MESSAGE_CONTENT"],
        &["AUTO_MODERATION_ACTION_EXECUTION"],
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn message_content_without_message_events_is_a_warning() {
    let p = ok(&["GUILDS", "MESSAGE_CONTENT"], &["GUILD_CREATE"]);
    assert_eq!(
        p.warnings,
        [
            "intent \"MESSAGE_CONTENT\" is declared but no subscribed event carries message \
          content (MESSAGE_CREATE, MESSAGE_UPDATE, AUTO_MODERATION_ACTION_EXECUTION); \
          remove it from [discord] intents"
        ]
    );
    assert!(!p.notes.iter().any(|n| n == MESSAGE_CONTENT_NOTE));
    assert_eq!(p.notes, [privileged_note("MESSAGE_CONTENT")]);
}

#[test]
fn missing_message_content_is_explained() {
    let p = ok(&["GUILD_MESSAGES"], &["MESSAGE_CREATE"]);
    assert!(p.warnings.is_empty());
    assert_eq!(p.notes.len(), 1);
    assert!(p.notes[0].starts_with("MESSAGE_CONTENT is not declared, so MESSAGE_CREATE"));
}

#[test]
fn undeliverable_single_intent() {
    let errors = err(&["GUILDS"], &["GUILD_CREATE", "GUILD_MEMBER_ADD"]);
    assert_eq!(
        errors,
        [IntentError::Undeliverable {
            event: "GUILD_MEMBER_ADD".into(),
            delivered_by: vec!["GUILD_MEMBERS"],
        }]
    );
    assert_eq!(
        errors[0].to_string(),
        "event \"GUILD_MEMBER_ADD\" can never arrive: no declared intent delivers it; add \
         \"GUILD_MEMBERS\" (privileged) to [discord] intents"
    );
}

#[test]
fn own_member_update_is_accepted_without_guild_members_with_a_note() {
    let p = ok(&["GUILDS"], &["GUILD_CREATE", "GUILD_MEMBER_UPDATE"]);
    assert_eq!(p.bits, 1);
    assert!(
        p.notes.iter().any(|n| n.starts_with(
            "GUILD_MEMBER_UPDATE is subscribed without its intent: updates to the bot's own \
             member arrive without GUILD_MEMBERS; other members' updates need"
        )),
        "{:?}",
        p.notes
    );
    // With the intent there is nothing to say about it.
    let p = ok(&["GUILD_MEMBERS"], &["GUILD_MEMBER_UPDATE"]);
    assert!(!p.notes.iter().any(|n| n.contains("without its intent")));
}

#[test]
fn guild_members_note_leaves_the_guild_create_member_list_to_presences() {
    let note = intent("GUILD_MEMBERS").unwrap().note.unwrap();
    assert!(
        !note.contains("for the full member list in GUILD_CREATE"),
        "{note}"
    );
    assert!(note.contains("takes GUILD_PRESENCES"), "{note}");
    assert!(
        note.contains("large_threshold") && note.contains("75,000"),
        "{note}"
    );
}

#[test]
fn guild_less_events_are_named_for_instances_without_shard_zero() {
    let p = ok(
        &["GUILDS", "GUILD_MESSAGES", "DIRECT_MESSAGES"],
        &[
            "GUILD_CREATE",
            "MESSAGE_CREATE",
            "ENTITLEMENT_CREATE",
            "INTERACTION_CREATE",
        ],
    );
    let warnings = shard_zero_warnings(&p);
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("MESSAGE_CREATE in DMs (declared DIRECT_MESSAGES)"));
    assert!(warnings[1].starts_with("ENTITLEMENT_CREATE has no guild_id"));
    assert!(warnings[2].starts_with("INTERACTION_CREATE from DMs"));
    let guild_only = ok(
        &["GUILDS", "GUILD_MESSAGES"],
        &["GUILD_CREATE", "MESSAGE_CREATE"],
    );
    assert!(shard_zero_warnings(&guild_only).is_empty());
}

#[test]
fn undeliverable_several_intents() {
    let errors = err(&[], &["MESSAGE_CREATE"]);
    assert_eq!(
        errors[0].to_string(),
        "event \"MESSAGE_CREATE\" can never arrive: no declared intent delivers it; add one \
         of \"GUILD_MESSAGES\", \"DIRECT_MESSAGES\" to [discord] intents"
    );
    // DIRECT_MESSAGES delivers MESSAGE_CREATE but not MESSAGE_DELETE_BULK.
    let errors = err(
        &["DIRECT_MESSAGES"],
        &["MESSAGE_CREATE", "MESSAGE_DELETE_BULK"],
    );
    assert_eq!(errors.len(), 1);
    assert!(
        matches!(&errors[0], IntentError::Undeliverable { event, .. } if event == "MESSAGE_DELETE_BULK")
    );
}

#[test]
fn unknown_intent_with_suggestion() {
    let errors = err(&["GUILDS", "GUILD_MESAGES"], &["MESSAGE_CREATE"]);
    // The typo's suggestion would deliver MESSAGE_CREATE: one error, not two.
    assert_eq!(
        errors,
        [IntentError::UnknownIntent {
            name: "GUILD_MESAGES".into(),
            suggestion: Some("GUILD_MESSAGES"),
        }]
    );
    assert_eq!(
        errors[0].to_string(),
        "unknown intent \"GUILD_MESAGES\" in [discord] intents; did you mean \
         \"GUILD_MESSAGES\"?"
    );
}

#[test]
fn unknown_intent_without_suggestion_and_event_in_intents() {
    let errors = err(&["EVERYTHING"], &[]);
    assert_eq!(
        errors[0].to_string(),
        "unknown intent \"EVERYTHING\" in [discord] intents; intents are upper-case names \
         such as \"GUILDS\" or \"GUILD_MESSAGES\""
    );
    let errors = err(&["PRESENCE_UPDATE"], &[]);
    assert_eq!(
        errors[0].to_string(),
        "unknown intent \"PRESENCE_UPDATE\" in [discord] intents; \"PRESENCE_UPDATE\" is an \
         event: list it in [discord] events and declare \"GUILD_PRESENCES\" (privileged) here"
    );
}

#[test]
fn unknown_event_with_suggestion() {
    let errors = err(&["GUILD_MESSAGES"], &["MESAGE_CREATE"]);
    assert_eq!(
        errors,
        [IntentError::UnknownEvent {
            name: "MESAGE_CREATE".into(),
            suggestion: Some("MESSAGE_CREATE"),
        }]
    );
    assert_eq!(
        errors[0].to_string(),
        "unknown event \"MESAGE_CREATE\" in [discord] events; did you mean \
         \"MESSAGE_CREATE\"?"
    );
    let errors = err(&[], &["GUILD_WEBHOOKS"]);
    assert_eq!(
        errors[0].to_string(),
        "unknown event \"GUILD_WEBHOOKS\" in [discord] events; \"GUILD_WEBHOOKS\" is an \
         intent: list it in [discord] intents, and its events here (WEBHOOKS_UPDATE)"
    );
}

#[test]
fn star_means_every_event_the_intents_deliver() {
    let p = ok(&["GUILDS", "GUILD_MESSAGES"], &["*"]);
    for event in [
        "GUILD_CREATE",
        "CHANNEL_CREATE",
        "MESSAGE_CREATE",
        "READY",
        "RESUMED",
    ] {
        assert!(
            p.events.iter().any(|e| e == event),
            "{event}: {:?}",
            p.events
        );
    }
    for event in ["PRESENCE_UPDATE", "TYPING_START", "GUILD_MEMBER_ADD"] {
        assert!(!p.events.iter().any(|e| e == event), "{event}");
    }
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let everything: Vec<&str> = INTENTS.iter().map(|i| i.name).collect();
    assert_eq!(ok(&everything, &["*"]).events.len(), ALL_EVENTS.len());
    assert_eq!(ok(&[], &["*"]).events.len(), NO_INTENT_EVENTS.len());
}

#[test]
fn all_errors_are_collected() {
    let errors = err(
        &["GUILD_MESAGES", "NOPE"],
        &["MESAGE_CREATE", "PRESENCE_UPDATE", "READY"],
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(matches!(errors[0], IntentError::UnknownIntent { .. }));
    assert!(matches!(
        errors[1],
        IntentError::UnknownIntent {
            suggestion: None,
            ..
        }
    ));
    assert!(matches!(errors[2], IntentError::UnknownEvent { .. }));
    assert!(
        matches!(&errors[3], IntentError::Undeliverable { event, .. } if event == "PRESENCE_UPDATE")
    );
}

#[test]
fn no_intent_events_need_nothing() {
    let p = ok(&[], NO_INTENT_EVENTS);
    assert_eq!(p.bits, 0);
    assert!(p.intents.is_empty());
    assert!(p.warnings.is_empty());
    assert_eq!(p.events.len(), 16);
}

#[test]
fn every_intent_makes_its_events_deliverable() {
    for i in INTENTS {
        let p = ok(&[i.name], i.events);
        assert_eq!(p.bits, i.mask());
    }
    let all: Vec<&str> = INTENTS.iter().map(|i| i.name).collect();
    let p = ok(&all, ALL_EVENTS);
    assert_eq!(p.bits, ALL_INTENTS_MASK);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(check_intent_bits(p.bits).is_ok());
}
