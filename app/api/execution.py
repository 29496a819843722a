"""The executor: strawberry's, with a subscription's events completed by a plan.

graphql-core executes every subscription event as a new operation on a copy of the
subscription's executor. Two costs came with that, per token a `generate` subscriber gets:

* it collected the root fields again, into new lists, and its memo of each object's
  sub-fields is keyed by the identity of those lists: the selection (fragments, type
  conditions, defer usages) was walked again every time. Here an event whose freshly
  collected root fields equal the first event's (always, as the document and variables of
  a subscription do not change) is executed with the first event's lists.
* it resolved every selected field through the generic machinery: a ResolveInfo built per
  field, the resolver called, the value completed by a chain of type checks. For the
  events' fields, all plain attributes, that was most of the event loop's CPU per token
  beside the websocket write. Here the selection is compiled once per subscription into
  completers (`_Plans`): per object type, the attributes to read and how to complete each
  (leaf coercion, lists, nullability, the concrete type of a union or interface), the
  way graphql-core's complete_value does.

A plan covers only what it can do exactly as graphql-core would: fields that strawberry
resolves by a plain getattr (no resolver, no field extension, no arguments), types chosen
by the value's own strawberry class, no @defer, no middleware (an extension with a resolve
hook, e.g. tracing, keeps the generic path for every field). Anything else, and any event
whose values would make an error (a null where the schema forbids one, an unexpected type,
a failed coercion), goes through graphql-core's own path, which produces the result and the
errors it always has. Each event's copy of the executor is also made without copy.copy's
generic path, and strawberry's per-result extension hooks are looked up once per
operation (LeanExtensionsRunner).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from graphql import (
    GraphQLObjectType,
    Undefined,
    is_abstract_type,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    is_object_type,
)
from graphql.language import OperationType
from strawberry.extensions import SchemaExtension
from strawberry.extensions.context import StreamResultContextManager
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types.cast import get_strawberry_type_cast
from strawberry.utils.await_maybe import await_maybe

Completer = Callable[[Any], Any]


class Unplanned(Exception):
    """This event or selection takes graphql-core's own path."""


class _Plans:
    """One subscription's compiled selection, shared by the per-event copies of its executor."""

    def __init__(self) -> None:
        self.root: Completer | None = None
        self.failed = False  # the root selection cannot be planned: every event takes the generic path


def _attribute(field_def) -> str | None:
    """The attribute a field reads when strawberry resolves it by a plain getattr, else None."""
    field = field_def.extensions.get("strawberry-definition")
    if field is None or field.base_resolver is not None or field.extensions or field.is_subscription:
        return None
    if field_def.args or getattr(field, "default_resolver", getattr) is not getattr:
        return None
    return field.python_name


def _refuse(reason: Unplanned) -> Completer:
    def refuse(value: Any) -> Any:
        raise reason
    return refuse


class InferQLExecutor(StrawberryGraphQLCoreExecutionContext):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Shared with the per-event copies (graphql-core makes them with copy.copy).
        self._root_fields: list = []
        self._plans = _Plans()

    def __copy__(self) -> InferQLExecutor:
        # What copy.copy does for a plain object (a new instance sharing the attributes),
        # without its generic __reduce_ex__ path: one copy per subscription event.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def execute_operation(self, serially: bool | None = None):
        # Once planned, an event needs neither the root fields collected again (the document
        # and variables of a subscription do not change) nor graphql-core's field machinery.
        plan = self._plans.root
        if plan is not None and (self.abort_signal is None or not self.abort_signal.aborted):
            try:
                data = plan(self.root_value)
            except Unplanned:
                pass
            else:
                return self.finish(self.build_response(data))
        return super().execute_operation(serially)

    def execute_collected_root_fields(self, root_type, root_value, grouped_field_set, serially, new_defer_usages):
        if self.operation.operation is OperationType.SUBSCRIPTION and not new_defer_usages:
            kept = self._root_fields
            if not kept:
                kept.append(grouped_field_set)
            elif kept[0] == grouped_field_set:  # same keys, same field nodes (compared by identity first)
                grouped_field_set = kept[0]
            plans = self._plans
            if not plans.failed:
                try:
                    if plans.root is None:
                        plans.root = self._plan_root(root_type, grouped_field_set)
                    return plans.root(root_value)
                except Unplanned:
                    plans.failed = plans.root is None
        return super().execute_collected_root_fields(root_type, root_value, grouped_field_set, serially,
                                                     new_defer_usages)

    # ---- the plan ------------------------------------------------------------------------

    def _plan_root(self, root_type: GraphQLObjectType, grouped_field_set) -> Completer:
        """The subscription's one root field: its value is the event itself (strawberry's
        resolver for a subscription field returns what the generator yielded)."""
        if self.middleware_manager is not None and getattr(self.middleware_manager, "middlewares", None):
            raise Unplanned("field middleware")
        if len(grouped_field_set) != 1:
            raise Unplanned("not one root field")
        (key, details), = grouped_field_set.items()
        field_def = root_type.fields.get(details[0].node.name.value)
        definition = field_def.extensions.get("strawberry-definition") if field_def else None
        if definition is None or not definition.is_subscription:
            raise Unplanned("not a strawberry subscription field")
        complete = self._completer(field_def.type, details)
        return lambda event: {key: complete(event)}

    def _completer(self, type_, details) -> Completer:
        if is_non_null_type(type_):
            inner = self._completer(type_.of_type, details)

            def non_null(value: Any) -> Any:
                if value is None:
                    raise Unplanned("null for a non-null field")  # graphql-core reports it
                return inner(value)
            return non_null
        if is_list_type(type_):
            item = self._completer(type_.of_type, details)

            def listed(value: Any) -> Any:
                if value is None:
                    return None
                if not isinstance(value, (list, tuple)):
                    raise Unplanned("not a list")
                return [item(v) for v in value]
            return listed
        if is_leaf_type(type_):
            coerce = type_.coerce_output_value

            def leaf(value: Any) -> Any:
                if value is None:
                    return None
                if isinstance(value, Exception):
                    raise Unplanned("an error as the value")
                out = coerce(value)
                if out is None or out is Undefined:
                    raise Unplanned("leaf not coerced")
                return out
            return leaf
        if is_abstract_type(type_) or is_object_type(type_):
            return self._object_completer(type_, details)
        raise Unplanned(f"type {type_}")

    def _object_completer(self, type_, details) -> Completer:
        """An object (or union / interface) value: the concrete type is the value's own
        strawberry class, as strawberry's resolve_type and is_type_of find it; each concrete
        type's fields are planned on its first value."""
        by_class: dict[type, Completer] = {}
        schema = self.schema

        def runtime_plan(cls: type) -> Completer:
            definition = getattr(cls, "__strawberry_definition__", None)
            if definition is None or definition.is_type_of is not None:
                raise Unplanned("no strawberry type, or its own is_type_of")
            runtime = schema.get_type(definition.name)
            if not is_object_type(runtime) or runtime.extensions.get("strawberry-definition") is not definition:
                raise Unplanned("not the class's own type")
            if runtime is not type_ and not (is_abstract_type(type_) and schema.is_sub_type(type_, runtime)):
                raise Unplanned("not a possible type")
            return self._fields(runtime, details)

        def complete(value: Any) -> Any:
            if value is None:
                return None
            plan = by_class.get(type(value))
            if plan is None:
                if isinstance(value, Exception) or get_strawberry_type_cast(value) is not None:
                    raise Unplanned("an error or a strawberry.cast as the value")
                try:
                    plan = runtime_plan(type(value))
                except Unplanned as exc:
                    plan = _refuse(exc)  # and every later value of this class
                by_class[type(value)] = plan
            return plan(value)
        return complete

    def _fields(self, runtime: GraphQLObjectType, details) -> Completer:
        collected = self.collect_subfields(runtime, details)
        if collected.new_defer_usages:
            raise Unplanned("@defer")
        steps: list[tuple[str, str | None, Completer | None]] = []
        for key, sub in collected.grouped_field_set.items():
            name = sub[0].node.name.value
            if name == "__typename":
                steps.append((key, None, None))
                continue
            field_def = runtime.fields.get(name)
            attribute = _attribute(field_def) if field_def is not None else None
            if attribute is None:
                raise Unplanned(f"{runtime.name}.{name} is not a plain attribute")
            steps.append((key, attribute, self._completer(field_def.type, sub)))
        type_name = runtime.name

        def complete(value: Any) -> dict[str, Any]:
            out = {}
            for key, attribute, completer in steps:
                out[key] = type_name if attribute is None else completer(getattr(value, attribute))
            return out
        return complete


class LeanExtensionsRunner(SchemaExtensionsRunner):
    """strawberry's runner of the schema extensions' hooks, with what a subscription pays per
    event done once per operation: for every result strawberry looked up each extension's
    on_stream_result hook again (and wrapped it in a new context-manager factory), and
    called every extension's get_results, most of them the base class's `{}`. Here the
    hooks are looked up on the first result and reused, and only the extensions that
    override get_results are asked. The hooks run as before, in the same order."""

    def __init__(self, execution_context, extensions=None) -> None:
        super().__init__(execution_context, extensions)
        self._stream_hooks: list | None = None
        base = SchemaExtension.get_results
        self._with_results = [e for e in self.extensions if type(e).get_results is not base]

    def on_stream_result(self, result) -> StreamResultContextManager:
        if self._stream_hooks is None:  # the first result: strawberry's own lookup, kept
            manager = StreamResultContextManager(self.extensions, result)
            self._stream_hooks = manager.hooks
            return manager
        if not self._stream_hooks:  # no extension has the hook: no exit stacks per result
            return _NO_HOOKS
        return _KeptHooks(self._stream_hooks, result)

    async def get_extensions_results(self, ctx) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for extension in self._with_results:
            data.update(await await_maybe(extension.get_results()))
        data.update(ctx.extensions_results)
        return data


# A streamed result's context when no extension has an on_stream_result hook: strawberry would
# still build two exit stacks for it (~5 % of the event loop's samples in a py-spy profile of 64
# streams, one result per token). nullcontext is both a sync and an async context manager.
_NO_HOOKS = contextlib.nullcontext()


class _KeptHooks(StreamResultContextManager):
    """strawberry's context manager for one streamed result, on hooks looked up before."""

    def __init__(self, hooks: list, result) -> None:
        # (not super().__init__: that would look the hooks up again)
        self.result = result
        self.hooks = hooks
